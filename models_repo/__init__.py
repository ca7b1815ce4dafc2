"""The model registry: every console name maps to one constructor taking the number of classes."""
from functools import partial

from dihkit.foundations.errors import UserError

from .base import StagedNet
from .cifar_resnet import cifar_resnet
from .resnet import imagenet_resnet
from .vgg import vgg11_bn
from .wrn import wide_resnet

MODELS = {
    "res8": partial(cifar_resnet, 8),
    "res14": partial(cifar_resnet, 14),
    "res20": partial(cifar_resnet, 20),
    "res110": partial(cifar_resnet, 110),
    "res18": partial(imagenet_resnet, [2, 2, 2, 2]),
    "res34": partial(imagenet_resnet, [3, 4, 6, 3]),
    "vgg11": vgg11_bn,
    "wrn-28-2": partial(wide_resnet, 28, 2),
}


def build_model(name: str, num_classes: int) -> StagedNet:
    """Construct the registry model ``name`` for ``num_classes`` classes."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)


def count_parameters(module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
