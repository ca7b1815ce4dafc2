"""ResNet-18/34/50: adapted to CIFAR (3x3 stride-1 stem, no max-pool), or in torchvision's ImageNet layout.

Four stages of widths 64-512; ResNet-50 uses bottleneck blocks (4x expansion, the stride on the 3x3 conv as
torchvision's v1.5). The CIFAR ResNet-50 is RepDistiller's and mdistiller's ``ResNet50`` (their ``resnetv2``),
whose ``ResNet18``/``ResNet34`` are res18/res34 here. The ImageNet layout (``torchvision=True``) has
torchvision's stem: a 7x7 stride-2 convolution, batch norm, ReLU and a 3x3 stride-2 max-pool; its blocks are
the same, so a torchvision state dict maps onto it by renaming alone (``models_repo/upstream.py``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import IMAGENET_HEAD_POOL, StagedNet, conv_bn_relu, init_weights
from .cifar_resnet import make_stage, projection


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to 4x ``planes``, each with batch norm."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = 4 * planes
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck residual forward."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x), inplace=True)


def bottleneck_stage(cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage of ``blocks`` Bottlenecks, the first one carrying the stride."""
    layers = [Bottleneck(cin, planes, stride)] + [Bottleneck(4 * planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def torchvision_stem() -> nn.Sequential:
    """7x7 stride-2 convolution, batch norm, ReLU, 3x3 stride-2 max-pool: a quarter of the input's size."""
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))


def imagenet_resnet(blocks: list[int], num_classes: int, bottleneck: bool = False,
                    torchvision: bool = False) -> StagedNet:
    """ResNet with 1x1 projection shortcuts, ``blocks`` per stage: BasicBlocks, or Bottlenecks; the CIFAR
    stem, or with ``torchvision`` torchvision's (and DIH heads that average-pool, ``StagedNet.head_pool``)."""
    widths = [64, 128, 256, 512]
    expansion = 4 if bottleneck else 1
    stages, cin = [], 64
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stride = 1 if i == 0 else 2
        stages.append(bottleneck_stage(cin, w, n, stride) if bottleneck else make_stage(cin, w, n, stride))
        cin = w * expansion
    stem = torchvision_stem() if torchvision else conv_bn_relu(3, 64)
    return init_weights(StagedNet(stem, stages, nn.Identity(), cin, num_classes,
                                  head_pool=IMAGENET_HEAD_POOL if torchvision else None))
