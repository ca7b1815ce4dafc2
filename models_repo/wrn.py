"""Wide ResNet (Zagoruyko and Komodakis 2016), pre-activation blocks, three stages of widths 16k/32k/64k."""
import torch
import torch.nn.functional as F
from torch import nn

from .base import StagedNet, init_weights


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice, 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation residual forward."""
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(depth: int, widen: int, num_classes: int) -> StagedNet:
    """WRN-depth-widen; the final BN-ReLU sits after the last mount point."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    stages, cin = [], 16
    for i, w in enumerate(widths):
        blocks = [WideBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*blocks))
        cin = w
    stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    tail = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
    return init_weights(StagedNet(stem, stages, tail, widths[-1], num_classes))
