"""VGG-11 with batch norm; its mount points are the first four max-pooling layers."""
from torch import nn

from .base import StagedNet, init_weights

# Convolution widths per pooling block (VGG configuration "A").
VGG11_BLOCKS = [[64], [128], [256, 256], [512, 512], [512, 512]]


def vgg_block(cin: int, widths: list[int]) -> nn.Sequential:
    """Conv(bias)-BN-ReLU for each width, then 2x2 max-pooling."""
    layers = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def vgg11_bn(num_classes: int) -> StagedNet:
    """VGG-11-BN with a linear classifier on the globally pooled 512-d feature."""
    blocks, cin = [], 3
    for widths in VGG11_BLOCKS:
        blocks.append(vgg_block(cin, widths))
        cin = widths[-1]
    return init_weights(StagedNet(nn.Identity(), blocks[:4], blocks[4], 512, num_classes))
