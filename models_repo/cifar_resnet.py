"""CIFAR ResNets of depth 6n+2 (He et al. 2016): three stages of BasicBlocks, widths 16/32/64.

Shortcuts that change shape are 1x1 convolutions with batch norm (He et al.'s "option B"), which gives
the parameter counts of the method's table (res20: 278,324 for 100 classes). The same network is
RepDistiller's ``resnet<depth>``; its ``resnet8x4``/``resnet32x4`` are this one with a 32-wide stem and
stages 64/128/256 wide.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import StagedNet, conv_bn_relu, init_weights


def projection(cin: int, cout: int, stride: int) -> nn.Module:
    """The shortcut of a residual block: identity, or a 1x1 convolution with batch norm when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or padded) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def make_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage of ``blocks`` BasicBlocks, the first one carrying the stride."""
    layers = [BasicBlock(cin, cout, stride)]
    layers += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


# Stem and stage widths: the standard ones, and RepDistiller's "x4" variant.
PLAIN, X4 = (16, 16, 32, 64), (32, 64, 128, 256)


def cifar_resnet(depth: int, num_classes: int, widths: tuple = PLAIN) -> StagedNet:
    """CIFAR ResNet of the given depth (6n+2); ``widths`` are the stem's and the three stages' channels."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stem, w1, w2, w3 = widths
    stages = [make_stage(stem, w1, n, 1), make_stage(w1, w2, n, 2), make_stage(w2, w3, n, 2)]
    return init_weights(StagedNet(conv_bn_relu(3, stem), stages, nn.Identity(), w3, num_classes))
