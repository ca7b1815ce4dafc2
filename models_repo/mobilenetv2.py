"""MobileNetV2 for CIFAR as RepDistiller builds it (``mobilenetv2_T_w``; ``mobile_half`` is expansion 6,
width 0.5): a stride-2 3x3 stem, seven groups of inverted residual blocks, a 1x1 conv to 1280 channels.

Every block keeps its 1x1 expansion conv, also at expansion 1. The four mount points are the feature
outputs RepDistiller's distillers use: after groups 2, 3, 5 and 7.
"""
import torch
from torch import nn

from .base import StagedNet, conv_bn_relu, init_weights

# (expansion, output channels at width 1, blocks, first stride) of each group; None: the net's expansion.
GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1)]
# Which groups end at each mount point.
MOUNT_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (carrying the stride), 1x1 linear projection; identity shortcut when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted residual forward."""
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(num_classes: int, expansion: int = 6, width: float = 0.5) -> StagedNet:
    """MobileNetV2 with the given expansion and width multiplier (defaults: RepDistiller's ``mobile_half``)."""
    cin = int(32 * width)
    groups = []
    for t, c, n, s in GROUPS:
        cout = int(c * width)
        blocks = []
        for stride in [s] + [1] * (n - 1):
            blocks.append(InvertedResidual(cin, cout, stride, expansion if t is None else t))
            cin = cout
        groups.append(nn.Sequential(*blocks))
    stages = [nn.Sequential(*(groups[g] for g in mount)) for mount in MOUNT_GROUPS]
    last = int(1280 * width) if width > 1.0 else 1280
    tail = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
    return init_weights(StagedNet(conv_bn_relu(3, int(32 * width), 2), stages, tail, last, num_classes))
