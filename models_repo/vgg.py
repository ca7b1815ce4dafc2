"""CIFAR VGGs with batch norm: five blocks of 3x3 Conv(bias)-BN-ReLU layers, a linear classifier on the
globally pooled 512-d feature.

Two networks share these convolutions. The seed's ``vgg11`` (the DIH authors' CIFAR VGG) max-pools after all
five blocks; its mount points are the first four pools (the DIH paper's head positions). RepDistiller's VGGs
(``vgg8``, ``vgg11_crd``, ``vgg13``, ``vgg16``, ``vgg19``) pool after the first three blocks, after the fourth
only for maps larger than 4x4 (their 64-px inputs), and average-pool the fifth block's 4x4 map. Their mount
points are the feature points RepDistiller's and mdistiller's distillers use (``feat[1:-1]`` of their
``forward``): the outputs of blocks 1 to 4, each taken before the pool that follows it. So their first block
is the stem, and each stage is the pool before a block followed by that block (vgg13 at 32 px: 128x16x16,
256x8x8, 512x4x4, 512x4x4).
"""
from collections import OrderedDict

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


def conv_layers(cin: int, widths: list[int]) -> list[nn.Module]:
    """Conv(bias)-BN-ReLU for each width."""
    layers = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return layers


def vgg11_bn(num_classes: int) -> StagedNet:
    """The seed's VGG-11-BN: each of the five blocks ends with a max-pool; the first four are the stages."""
    blocks, cin = [], 3
    for widths in VGG_BLOCKS[11]:
        blocks.append(nn.Sequential(*conv_layers(cin, widths), nn.MaxPool2d(2)))
        cin = widths[-1]
    return init_weights(StagedNet(nn.Identity(), blocks[:4], blocks[4], 512, num_classes))


def pooled_block(pool: nn.Module, cin: int, widths: list[int]) -> nn.Sequential:
    """``pool`` then the block's layers, the layers numbered from 0 as in RepDistiller's own block (so its
    tensor names match theirs one to one) and the parameter-free pool named ``pool``."""
    return nn.Sequential(OrderedDict([("pool", pool), *((str(i), m) for i, m in enumerate(conv_layers(cin, widths)))]))


def repdistiller_vgg(depth: int, num_classes: int) -> StagedNet:
    """RepDistiller's VGG-``depth``-BN: block 0 is the stem; the stages are blocks 1-4, each after its pool
    (max-pools before blocks 1-3, before block 4 only down to 4x4 maps); nothing after block 4."""
    widths = VGG_BLOCKS[depth]
    pools = [nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2), PoolDownTo(4)]
    stages = [pooled_block(pool, w_in[-1], w) for pool, w_in, w in zip(pools, widths, widths[1:])]
    return init_weights(StagedNet(nn.Sequential(*conv_layers(3, widths[0])), stages, nn.Identity(), 512, num_classes))
