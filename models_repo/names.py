"""Model names that mean a CIFAR network on small images and an ImageNet one on large images.

torchvision's names (``resnet18``...) and the CIFAR benchmark's (``ResNet50``, ``MobileNetV2``; mdistiller uses
these for its ImageNet networks too) each name two networks of one family: the CIFAR layout, made for 32-px
images (3x3 stride-1 stems, total stride 8 to 16), and torchvision's ImageNet layout (7x7 stride-2 stem and
max-pool, total stride 32). The console resolves such a name by the dataset's image size, here and nowhere
else, and says so in one line. Every other name means one network at every size; the DIH paper's res18 and
res34 are the CIFAR layout on Tiny-ImageNet too, as the paper runs them.
"""

# From this image size up (Tiny-ImageNet's 64 px, ImageNet's crops), such a name means the ImageNet layout.
LARGE_IMAGE_PX = 64
# name -> (the registry network for images under LARGE_IMAGE_PX, the one from LARGE_IMAGE_PX up).
BY_IMAGE_SIZE = {
    "resnet18": ("res18", "resnet18"),
    "resnet34": ("res34", "resnet34"),
    "resnet50": ("ResNet50", "resnet50"),
    "ResNet50": ("ResNet50", "resnet50"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"),
    "MobileNetV2": ("MobileNetV2", "mobilenet_v2"),
}


def resolve_name(name: str, image_size: int | None) -> str:
    """The registry network ``name`` means at ``image_size`` px (None, unknown: ``name`` itself)."""
    if image_size is None or name not in BY_IMAGE_SIZE:
        return name
    small, large = BY_IMAGE_SIZE[name]
    return large if image_size >= LARGE_IMAGE_PX else small


def resolution_line(changed: list[tuple[str, str, str]], image_size: int) -> str:
    """The one line that reports the names resolved: ``changed`` holds (flag, name given, network)."""
    names = ", ".join(f"{flag} {given} is {arch}" for flag, given, arch in changed)
    return (f"model names at {image_size} px: {names} (these names mean the CIFAR layout under {LARGE_IMAGE_PX} px, "
            f"torchvision's ImageNet layout from {LARGE_IMAGE_PX} px up; docs/IMAGENET.md#names-by-image-size)")
