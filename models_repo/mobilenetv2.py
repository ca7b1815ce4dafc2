"""MobileNetV2 for CIFAR as RepDistiller builds it, and in torchvision's ImageNet layout.

RepDistiller's ``mobilenetv2_T_w`` (``mobile_half`` is expansion 6, width 0.5): a stride-2 3x3 stem, seven
groups of inverted residual blocks, a 1x1 conv to 1280 channels; every block keeps its 1x1 expansion conv,
also at expansion 1, and its activations are ReLUs. torchvision's ``mobilenet_v2`` (width 1) differs in
facts only: the second group's first stride is 2 (a network of stride 32, not 16), an expansion-1 block has no
expansion conv, the activations are ReLU6, each conv-BN-ReLU6 unit of a block is nested (its state-dict
keys), and a dropout of 0.2 comes before the classifier. The four mount points are the feature outputs
RepDistiller's distillers use: after groups 2, 3, 5 and 7.
"""
import torch
from torch import nn

from .base import IMAGENET_HEAD_POOL, StagedNet, conv_bn_relu, init_weights

# (expansion, output channels at width 1, blocks, first stride) of each group; None: the net's expansion.
GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1)]
# torchvision's first strides of the groups (inverted_residual_setting): the second group halves too.
TORCHVISION_STRIDES = (1, 2, 2, 2, 1, 2, 1)
# Which groups end at each mount point.
MOUNT_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]
# torchvision's dropout before the classifier.
TORCHVISION_DROPOUT = 0.2


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (carrying the stride), 1x1 linear projection; identity shortcut when the
    shape is kept. ``torchvision``: its block (no expansion conv at expansion 1, ReLU6, nested units)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, torchvision: bool = False):
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        act = nn.ReLU6 if torchvision else nn.ReLU
        units = [] if torchvision and expansion == 1 else [conv_bn_relu(cin, mid, kernel=1, act=act)]
        units.append(conv_bn_relu(mid, mid, stride, groups=mid, act=act))
        # RepDistiller's block is one flat Sequential; torchvision's keeps each conv-BN-ReLU6 unit as one.
        layers = units if torchvision else [m for unit in units for m in unit]
        self.conv = nn.Sequential(*layers, nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted residual forward."""
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(num_classes: int, expansion: int = 6, width: float = 0.5, torchvision: bool = False) -> StagedNet:
    """MobileNetV2 with the given expansion and width multiplier (defaults: RepDistiller's ``mobile_half``);
    ``torchvision``: torchvision's layout (use it at width 1, as torchvision's ``mobilenet_v2``)."""
    act = nn.ReLU6 if torchvision else nn.ReLU
    strides = TORCHVISION_STRIDES if torchvision else [s for *_, s in GROUPS]
    cin = int(32 * width)
    groups = []
    for (t, c, n, _), s in zip(GROUPS, strides):
        cout = int(c * width)
        blocks = []
        for stride in [s] + [1] * (n - 1):
            blocks.append(InvertedResidual(cin, cout, stride, expansion if t is None else t, torchvision))
            cin = cout
        groups.append(nn.Sequential(*blocks))
    stages = [nn.Sequential(*(groups[g] for g in mount)) for mount in MOUNT_GROUPS]
    last = int(1280 * width) if width > 1.0 else 1280
    tail = conv_bn_relu(cin, last, kernel=1, act=act)
    net = init_weights(StagedNet(conv_bn_relu(3, int(32 * width), 2, act=act), stages, tail, last, num_classes,
                                 dropout=TORCHVISION_DROPOUT if torchvision else 0.0,
                                 head_pool=IMAGENET_HEAD_POOL if torchvision else None))
    if torchvision:  # torchvision initialises its classifier from N(0, 0.01), bias zero
        nn.init.normal_(net.fc.weight, 0, 0.01)
        nn.init.zeros_(net.fc.bias)
    return net
