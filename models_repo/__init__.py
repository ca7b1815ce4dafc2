"""The model registry: every console name maps to one constructor taking the number of classes."""
from functools import partial

from dihkit.foundations.errors import UserError

from .base import StagedNet
from .cifar_resnet import X4, cifar_resnet
from .mobilenetv1 import mobilenet_v1
from .mobilenetv2 import mobilenet_v2
from .resnet import imagenet_resnet
from .shufflenet import shufflenet_v1, shufflenet_v2
from .vgg import repdistiller_vgg, vgg11_bn
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
# The CIFAR-100 distillation benchmark (RepDistiller, mdistiller), under their names (docs/BENCHMARK.md).
# Their vgg11 is not the seed's: it is registered as vgg11_crd.
BENCHMARK = {
    **{f"resnet{d}": partial(cifar_resnet, d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet, 8, widths=X4),
    "resnet32x4": partial(cifar_resnet, 32, widths=X4),
    **{f"wrn_{d}_{w}": partial(wide_resnet, d, w) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    "vgg8": partial(repdistiller_vgg, 8),
    "vgg11_crd": partial(repdistiller_vgg, 11),
    **{f"vgg{d}": partial(repdistiller_vgg, d) for d in (13, 16, 19)},
    "MobileNetV2": mobilenet_v2,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
    "ResNet50": partial(imagenet_resnet, [3, 4, 6, 3], bottleneck=True),
}
MODELS.update(BENCHMARK)
# ImageNet's distillation pairs (mdistiller, torchdistill): torchvision's layouts under torchvision's names, and
# mdistiller's MobileNetV1; their DIH heads pool (docs/IMAGENET.md). Names resolve by image size: models_repo/names.py.
IMAGENET = {
    "resnet18": partial(imagenet_resnet, [2, 2, 2, 2], torchvision=True),
    "resnet34": partial(imagenet_resnet, [3, 4, 6, 3], torchvision=True),
    "resnet50": partial(imagenet_resnet, [3, 4, 6, 3], bottleneck=True, torchvision=True),
    "mobilenet_v2": partial(mobilenet_v2, width=1.0, torchvision=True),
    "mobilenet_v1": mobilenet_v1,
}
MODELS.update(IMAGENET)


def build_model(name: str, num_classes: int) -> StagedNet:
    """Construct the registry model ``name`` for ``num_classes`` classes."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)


def count_parameters(module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
