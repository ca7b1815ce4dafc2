"""MobileNetV1 as mdistiller defines it for ImageNet (``mdistiller/models/imagenet/mobilenetv1.py``).

Howard et al.'s network at width 1: a 3x3 stride-2 conv-BN-ReLU to 32 channels, then 13 depthwise-separable
blocks (3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU), global average pooling and a linear layer.
mdistiller holds the 14 units in one ``model`` Sequential and reads its four feature maps after units 3, 5,
11 and 13 (128, 256, 512 and 1024 channels at strides 4, 8, 16 and 32): those are the mount points here.
Facts that differ from mdistiller's file: it pools with ``AvgPool2d(7)`` (global at 224 px only; global
here at any size) and its classifier has 1000 outputs whatever the dataset. Like mdistiller's, the layers
keep PyTorch's default initialisation.
"""
from torch import nn

from .base import IMAGENET_HEAD_POOL, StagedNet, conv_bn_relu

STEM_WIDTH = 32
# (output channels, stride) of the 13 depthwise-separable blocks, mdistiller's model[1..13].
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
# The last unit of the stem and of each stage, as indices of mdistiller's ``model`` (unit 0 is the first conv).
STAGE_ENDS = (1, 3, 5, 11, 13)


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv-BN-ReLU (carrying the stride), then 1x1 pointwise conv-BN-ReLU: one flat Sequential
    (indices 0-5, mdistiller's ``conv_dw``)."""
    return nn.Sequential(*conv_bn_relu(cin, cin, stride, groups=cin), *conv_bn_relu(cin, cout, kernel=1))


def unit_prefix(index: int) -> str:
    """Where mdistiller's ``model.<index>`` sits in this registry's layout (``stem.1.``, ``stages.2.0.``...)."""
    if index <= STAGE_ENDS[0]:
        return f"stem.{index}."
    stage = next(s for s in range(len(STAGE_ENDS) - 1) if index <= STAGE_ENDS[s + 1])
    return f"stages.{stage}.{index - STAGE_ENDS[stage] - 1}."


def mobilenet_v1(num_classes: int) -> StagedNet:
    """mdistiller's MobileNetV1 for ``num_classes`` classes, four mount points, DIH heads that pool."""
    units, cin = [conv_bn_relu(3, STEM_WIDTH, 2)], STEM_WIDTH
    for cout, stride in BLOCKS:
        units.append(separable(cin, cout, stride))
        cin = cout
    stem = nn.Sequential(*units[:STAGE_ENDS[0] + 1])
    stages = [nn.Sequential(*units[a + 1:b + 1]) for a, b in zip(STAGE_ENDS, STAGE_ENDS[1:])]
    return StagedNet(stem, stages, nn.Identity(), cin, num_classes, head_pool=IMAGENET_HEAD_POOL)
