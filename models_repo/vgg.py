"""CIFAR VGGs with batch norm: five blocks of 3x3 Conv(bias)-BN-ReLU layers, a linear classifier on the
globally pooled 512-d feature.

Two networks share these tensors. The seed's ``vgg11`` (the DIH authors' CIFAR VGG) max-pools after all
five blocks; its mount points are the first four pools. RepDistiller's VGGs (``vgg8``, ``vgg11_crd``,
``vgg13``, ``vgg16``, ``vgg19``) pool after the first three blocks, pool after the fourth only for maps
larger than 4x4 (their 64-px inputs), and average-pool the fifth block's 4x4 map; their mount points are
the outputs of the first four blocks, after those pools.
"""
from torch import nn

from .base import StagedNet, init_weights

# Convolution widths per block: VGG configurations "A" (11), "B" (13), "D" (16), "E" (19) and
# RepDistiller's "S" (8).
VGG_BLOCKS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class PoolDownTo(nn.Module):
    """2x2 max-pooling of maps larger than ``size`` x ``size``; smaller maps pass unchanged."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        """Pool only a map larger than the target size."""
        return self.pool(x) if x.shape[-1] > self.size else x


def vgg_block(cin: int, widths: list[int], pool: nn.Module) -> nn.Sequential:
    """Conv(bias)-BN-ReLU for each width, then ``pool``."""
    layers = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers, pool)


def cifar_vgg(depth: int, num_classes: int, pools: list) -> StagedNet:
    """VGG-``depth``-BN whose five blocks end with the ``pools`` (module factories)."""
    blocks, cin = [], 3
    for widths, pool in zip(VGG_BLOCKS[depth], pools):
        blocks.append(vgg_block(cin, widths, pool()))
        cin = widths[-1]
    return init_weights(StagedNet(nn.Identity(), blocks[:4], blocks[4], 512, num_classes))


def vgg11_bn(num_classes: int) -> StagedNet:
    """The seed's VGG-11-BN: a max-pool after every block."""
    return cifar_vgg(11, num_classes, [lambda: nn.MaxPool2d(2)] * 5)


def repdistiller_vgg(depth: int, num_classes: int) -> StagedNet:
    """RepDistiller's VGG-``depth``-BN: three max-pools, a fourth down to 4x4 maps only, none after block 5."""
    return cifar_vgg(depth, num_classes, [lambda: nn.MaxPool2d(2)] * 3 + [lambda: PoolDownTo(4), nn.Identity])
