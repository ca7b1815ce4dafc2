"""Key renaming rules from other code's models to this registry's layout: RepDistiller's and mdistiller's
CIFAR models, torchvision's ImageNet ResNets and MobileNetV2, mdistiller's ImageNet MobileNetV1.

Their checkpoints (``{'epoch', 'model': state_dict, 'accuracy', 'optimizer'}``, ``{'model': ...}``, or
torchvision's bare ``state_dict()``) name tensors after their modules (``conv1.``, ``layer1.``,
``block1.layer.``, ``blocks.``, ``features.``, ``linear.``...). Each architecture family has an explicit list
of (anchored pattern, replacement) rules; the first rule that matches a key renames it, and a key no rule
matches belongs to another architecture. Nothing is matched fuzzily: the renamed tensors are then checked one
by one against the model's names and shapes.
"""
import re

from dihkit.foundations.errors import UserError

from .mobilenetv1 import unit_prefix
from .mobilenetv2 import GROUPS


def stage(m: re.Match) -> str:
    """``stages.<k-1>.`` for an upstream 1-based ``layer<k>.``/``block<k>.layer.``."""
    return f"stages.{int(m[1]) - 1}."


RESNET = [(r"conv1\.", "stem.0."), (r"bn1\.", "stem.1."),
          (r"layer([1-9])\.(\d+)\.downsample\.", lambda m: f"{stage(m)}{m[2]}.shortcut."),
          (r"layer([1-9])\.", stage), (r"fc\.", "fc.")]
WRN = [(r"conv1\.", "stem."), (r"bn1\.", "tail.0."),
       (r"block([1-3])\.layer\.(\d+)\.convShortcut\.", lambda m: f"{stage(m)}{m[2]}.shortcut."),
       (r"block([1-3])\.layer\.", stage), (r"fc\.", "fc.")]
# resnetv2 (ResNet18/34/50) and the ShuffleNets: ``conv1``/``bn1`` stem, ``layer<k>``, ``linear``.
LAYERED = [(r"conv1\.", "stem.0."), (r"bn1\.", "stem.1."), (r"layer([1-4])\.", stage), (r"linear\.", "fc.")]
SHUFFLE_V2 = LAYERED + [(r"conv2\.", "tail.0."), (r"bn2\.", "tail.1.")]
BENCHMARK_VGGS = ("vgg8", "vgg11_crd", "vgg13", "vgg16", "vgg19")
# VGG: block 0 is the stem, blocks 1-4 the stages (models_repo/vgg.py), their layers numbered alike.
VGG = [(r"block0\.", "stem."), (r"block([1-4])\.", stage), (r"classifier\.", "fc.")]
# MobileNetV2's seven block groups, two to a mount point but the second (models_repo/mobilenetv2.py).
MOBILE_GROUP = {"0": "0.0", "1": "0.1", "2": "1.0", "3": "2.0", "4": "2.1", "5": "3.0", "6": "3.1"}
MOBILENET = [(r"conv1\.", "stem."), (r"blocks\.([0-6])\.", lambda m: f"stages.{MOBILE_GROUP[m[1]]}."),
             (r"conv2\.", "tail."), (r"classifier\.0\.", "fc.")]


def torchvision_mobilenet_unit(m: re.Match) -> str:
    """Where torchvision's MobileNetV2 ``features.<i>.`` sits here: 0 the stem, 1-17 the blocks group by
    group (each group's place from MOBILE_GROUP), 18 the last 1x1 conv (the tail)."""
    i = int(m[1])
    if i == 0:
        return "stem."
    for g, (_, _, blocks, _) in enumerate(GROUPS):
        if i <= blocks:
            return f"stages.{MOBILE_GROUP[str(g)]}.{i - 1}."
        i -= blocks
    return "tail."


# torchvision's ResNets name their modules as RepDistiller's CIFAR ResNets do (``downsample`` included).
TORCHVISION_RESNET = RESNET
TORCHVISION_MOBILENET = [(r"features\.(1[0-8]|[0-9])\.", torchvision_mobilenet_unit), (r"classifier\.1\.", "fc.")]
MDISTILLER_MOBILENET_V1 = [(r"model\.(1[0-3]|[0-9])\.", lambda m: unit_prefix(int(m[1]))), (r"fc\.", "fc.")]

RULES = {
    **{f"res{d}": RESNET for d in (8, 14, 20, 110)},
    **{f"resnet{d}": RESNET for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": RESNET, "resnet32x4": RESNET,
    **{name: WRN for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn-28-2")},
    **{name: VGG for name in BENCHMARK_VGGS},
    "res18": LAYERED, "res34": LAYERED, "ResNet50": LAYERED, "ShuffleV1": LAYERED,
    "ShuffleV2": SHUFFLE_V2, "MobileNetV2": MOBILENET,
    "resnet18": TORCHVISION_RESNET, "resnet34": TORCHVISION_RESNET, "resnet50": TORCHVISION_RESNET,
    "mobilenet_v2": TORCHVISION_MOBILENET, "mobilenet_v1": MDISTILLER_MOBILENET_V1,
}
# Whose layout each architecture's rules read; every other one is RepDistiller's/mdistiller's CIFAR layout.
SOURCES = {"resnet18": "torchvision", "resnet34": "torchvision", "resnet50": "torchvision",
           "mobilenet_v2": "torchvision", "mobilenet_v1": "mdistiller"}


def source_of(arch: str) -> str:
    """The code whose files the rules of ``arch`` read, for messages and records (``torchvision``...)."""
    return SOURCES.get(arch, "RepDistiller/mdistiller")


# The toolkit's own layout of the RepDistiller VGGs before their mount points became RepDistiller's feature
# points: the same network, its first block then counted as stage 0 and its fifth as the tail.
EARLIER_VGG = [(r"stages\.0\.", "stem."), (r"stages\.([1-3])\.", stage),
               (r"tail\.", "stages.3."), (r"fc\.", "fc.")]
# A batch norm's step counter: files of PyTorch before 0.4.1 lack it, and torch's load_state_dict accepts that.
BATCH_COUNTER = "num_batches_tracked"
# Top-level names only this toolkit's models use (every one has ``stages.``; upstream files share ``fc.``).
OWN_PREFIXES = ("stem.", "stages.", "tail.")


def is_upstream(state: dict) -> bool:
    """Whether a state dict names none of its tensors as this toolkit's models do (stem/stages/tail): a
    file of other code, which the rules may map; a file with some such names is checked as it is."""
    return bool(state) and not any(k.startswith(OWN_PREFIXES) for k in state)


def in_earlier_layout(state: dict, arch: str | None) -> bool:
    """Whether ``state`` holds a RepDistiller VGG in this toolkit's earlier layout (its fifth block a tail)."""
    return arch in BENCHMARK_VGGS and any(k.startswith("tail.") for k in state)


def from_earlier_layout(state: dict) -> dict:
    """A benchmark VGG's tensors renamed from the earlier layout (``in_earlier_layout``), in order."""
    return {rename(k, EARLIER_VGG) or k: v for k, v in state.items()}


def rename(key: str, rules) -> str | None:
    """``key`` renamed by the first rule whose pattern matches its start, or None when none does."""
    for pattern, replacement in rules:
        m = re.match(pattern, key)
        if m:
            new = replacement(m) if callable(replacement) else m.expand(replacement)
            return new + key[m.end():]
    return None


def shape_text(value) -> str:
    """A tensor's shape as a tuple, for messages."""
    return str(tuple(value.shape)) if hasattr(value, "shape") else type(value).__name__


def from_upstream(state: dict, arch: str, expected: dict | None, source: str) -> dict:
    """``state`` (an upstream state dict) renamed to ``arch``'s layout and checked tensor by tensor against
    ``expected`` (name -> shape; None: names renamed only). A key that no rule of ``arch`` maps, or that
    has no counterpart or another shape in ``arch``, is refused naming the key and its shape, in file order.
    """
    rules = RULES.get(arch)
    if rules is None:
        hint = " (their vgg11 is vgg11_crd here)" if arch == "vgg11" else ""
        raise UserError(f"{source} is not in this toolkit's layout, and no RepDistiller/mdistiller rule exists "
                        f"for a {arch}{hint}; its first key is '{next(iter(state))}'")
    source_code, out = source_of(arch), {}
    for key, value in state.items():
        new = rename(key, rules)
        if new is None:
            raise UserError(f"{source} does not hold a {source_code} {arch}: key '{key}' "
                            f"{shape_text(value)} matches none of its rules")
        if expected is not None and new not in expected:
            raise UserError(f"{source} does not hold a {source_code} {arch}: key '{key}' "
                            f"{shape_text(value)} has no counterpart in a {arch}")
        if expected is not None and shape_text(value) != str(tuple(expected[new])):
            raise UserError(f"{source} does not hold a {source_code} {arch}: key '{key}' has shape "
                            f"{shape_text(value)}, a {arch} needs {tuple(expected[new])}")
        out[new] = value
    missing = [k for k in (expected or {}) if k not in out and not k.endswith(BATCH_COUNTER)]
    if missing:
        raise UserError(f"{source} does not hold a {source_code} {arch}: it lacks the tensor this "
                        f"toolkit names '{missing[0]}'")
    return out
