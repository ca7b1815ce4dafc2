"""ShuffleNet V1 (Zhang et al. 2018; 3 groups, widths 240/480/960) and V2 (Ma et al. 2018; widths
116/232/464, 1x1 conv to 1024) for CIFAR as RepDistiller builds them (``ShuffleV1``, ``ShuffleV2``):
a 1x1 stem of 24 channels, three stages that each halve the resolution, and no max-pool.
The three stage outputs are the mount points.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import StagedNet, init_weights


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    """A convolution without bias (padding keeps the size at stride 1) and its batch norm."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)


def stem() -> nn.Sequential:
    """1x1 conv to 24 channels, batch norm, ReLU."""
    return nn.Sequential(*conv_bn(3, 24), nn.ReLU(inplace=True))


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1. At stride 2 the 3x3-average-pooled input is
    concatenated to the ``cout`` new channels; at stride 1 it is added."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        # The unit after the 24-channel stem has too few input channels to group its first 1x1.
        self.groups = 1 if cin == 24 else groups
        self.conv1, self.bn1 = conv_bn(cin, mid, groups=self.groups)
        self.conv2, self.bn2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = conv_bn(mid, cout, groups=groups)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffle unit forward."""
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


def shufflenet_v1(num_classes: int, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3) -> StagedNet:
    """ShuffleNet V1; each stage's first unit has stride 2 and adds ``width - cin`` channels."""
    stages, cin = [], 24
    for width, n in zip(widths, blocks):
        units = [ShuffleUnitV1(cin, width - cin, 2, groups)]
        units += [ShuffleUnitV1(width, width, 1, groups) for _ in range(n - 1)]
        stages.append(nn.Sequential(*units))
        cin = width
    return init_weights(StagedNet(stem(), stages, nn.Identity(), cin, num_classes))


class ShuffleUnitV2(nn.Module):
    """Keeps half the channels, passes the other half through 1x1, 3x3 depthwise, 1x1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = conv_bn(half, half)
        self.conv2, self.bn2 = conv_bn(half, half, 3, groups=half)
        self.conv3, self.bn3 = conv_bn(half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Split, transform one half, concatenate, shuffle."""
        keep, rest = x.chunk(2, dim=1)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(rest)))))
        return channel_shuffle(torch.cat([keep, F.relu(self.bn3(self.conv3(out)))], 1), 2)


class DownUnitV2(nn.Module):
    """Two stride-2 branches of ``cout / 2`` channels each: 3x3 depthwise then 1x1; 1x1, 3x3 depthwise, 1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = conv_bn(cin, cin, 3, 2, groups=cin)
        self.conv2, self.bn2 = conv_bn(cin, mid)
        self.conv3, self.bn3 = conv_bn(cin, mid)
        self.conv4, self.bn4 = conv_bn(mid, mid, 3, 2, groups=mid)
        self.conv5, self.bn5 = conv_bn(mid, mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both branches, concatenated and shuffled."""
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return channel_shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


def shufflenet_v2(num_classes: int, widths=(116, 232, 464), blocks=(3, 7, 3), last: int = 1024) -> StagedNet:
    """ShuffleNet V2 (RepDistiller's net size 1): per stage a down unit, then ``blocks`` basic units."""
    stages, cin = [], 24
    for width, n in zip(widths, blocks):
        stages.append(nn.Sequential(DownUnitV2(cin, width), *(ShuffleUnitV2(width) for _ in range(n))))
        cin = width
    tail = nn.Sequential(*conv_bn(cin, last), nn.ReLU(inplace=True))
    return init_weights(StagedNet(stem(), stages, tail, last, num_classes))
