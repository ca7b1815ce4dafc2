"""CIFAR ResNets of depth 6n+2 (He et al. 2016): three stages of BasicBlocks, widths 16/32/64.

Shortcuts that change shape are 1x1 convolutions with batch norm (He et al.'s "option B"), which gives
the parameter counts of the method's table (res20: 278,324 for 100 classes).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import StagedNet, conv_bn_relu, init_weights


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or padded) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

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


def cifar_resnet(depth: int, num_classes: int) -> StagedNet:
    """CIFAR ResNet of the given depth (6n+2)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stages = [make_stage(16, 16, n, 1), make_stage(16, 32, n, 2), make_stage(32, 64, n, 2)]
    return init_weights(StagedNet(conv_bn_relu(3, 16), stages, nn.Identity(), 64, num_classes))
