"""ResNet-18/34 adapted to CIFAR: 3x3 stride-1 stem, no max-pool, four stages of widths 64-512."""
from torch import nn

from .base import StagedNet, conv_bn_relu, init_weights
from .cifar_resnet import make_stage


def imagenet_resnet(blocks: list[int], num_classes: int) -> StagedNet:
    """ResNet with BasicBlocks and 1x1 projection shortcuts, ``blocks`` per stage."""
    widths = [64, 128, 256, 512]
    stages, cin = [], 64
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stages.append(make_stage(cin, w, n, 1 if i == 0 else 2))
        cin = w
    return init_weights(StagedNet(conv_bn_relu(3, 64), stages, nn.Identity(), 512, num_classes))
