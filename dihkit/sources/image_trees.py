"""Folders of class folders, ``imagefolder`` and ``imagenet``: held in memory, or streamed from their files.

ImageNet (ILSVRC-2012 after the usual validation preparation: ``train/<wnid>/*.JPEG``,
``val/<wnid>/*.JPEG``) is always streamed: its JPEGs differ in size, and 1.28 million of them at 224 px
would take about 190 GB decoded. An image folder is decoded into memory (``data_sources``) when its decoded
size, the image count times the first image's pixels, fits the memory budget, and streamed otherwise;
``stream`` ``"yes"`` or ``"no"`` forces the choice. Either way the bundle's ``held`` says which and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dihkit.sources.data_sources import list_image_tree, load_imagefolder
from dihkit.sources.data_types import DatasetInfo, FileSplit, ImageTree
from dihkit.foundations.errors import UserError

TREES = ("imagefolder", "imagenet")
# torchvision's ImageNet normalisation (the constants its pretrained weights were trained with).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP = 224
# The share of the memory a process may fill with decoded images (the rest: models, loaders, the system).
BUDGET_SHARE = 0.5


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes of decoded images a process may hold in memory, and where that number comes from."""
    bytes: int
    source: str


def memory_budget(processes: int = 1) -> MemoryBudget:
    """Half of this machine's memory (or of its cgroup's limit, when lower), shared by ``processes`` per node.

    The total rather than the free memory: every process of a node must reach the same decision.
    """
    total, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit() and int(limit) < total:
            total, where = int(limit), "this container's memory limit"
    except OSError:
        pass
    share = int(total * BUDGET_SHARE) // max(processes, 1)
    per = f" over {processes} processes on this node" if processes > 1 else ""
    return MemoryBudget(share, f"{BUDGET_SHARE:.0%} of {where} ({total / 1e9:.1f} GB){per}")


def list_imagenet(data_dir: str) -> ImageTree:
    """List ``data_dir/{train,val}/<wnid>/``; the validation images become the test split."""
    root = Path(data_dir)
    for folder in (root / "train", root / "val"):
        if not folder.is_dir():
            raise UserError(f"ImageNet needs {root}/train/<wnid>/ and {root}/val/<wnid>/ and {folder} is missing; "
                            f"sort the 50,000 validation images into wnid folders first (docs/IMAGENET.md)")
    return list_image_tree(data_dir, "val")


def load_image_tree(name: str, data_dir: str, cache_dir, stream: str, crop: int | None,
                    budget: MemoryBudget | None):
    """``(info, train, test, held)`` of an image tree: decoded into memory, or as ``FileSplit`` s to stream.

    ``stream``: ``"yes"``, ``"no"`` or ``"auto"`` (stream when the decoded images exceed ``budget``; without
    a budget, never). ``crop`` is the streamed crop (default: 224 for ImageNet, else the first image's
    shorter side, at most 224); it is refused for a tree held in memory, which keeps its images' size.
    """
    tree = list_imagenet(data_dir) if name == "imagenet" else list_image_tree(data_dir)
    streamed, why = _choose(name, tree, stream, budget)
    if not streamed:
        if crop is not None:
            raise UserError(f"--crop_size {crop} sets the crop of streamed images, but this run holds {name} in "
                            f"memory at its images' own size ({why}); leave --crop_size out or pass "
                            f"--data_path stream")
        info, train, test = load_imagefolder(tree, cache_dir)
        return info, train, test, f"in memory ({why})"
    crop = crop or (DEFAULT_CROP if name == "imagenet" else min(DEFAULT_CROP, min(_first_size(tree))))
    # A streamed folder is normalised as ImageNet is: its statistics would take a pass over every file.
    info = DatasetInfo(name=name, num_classes=len(tree.classes), image_size=crop, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, classes=tree.classes)
    train = _file_split(tree.root, tree.train_files, tree.train_labels)
    test = _file_split(tree.root, tree.test_files, tree.test_labels)
    return info, train, test, f"streamed from the image files, crop {crop} ({why})"


def _choose(name: str, tree: ImageTree, stream: str, budget: MemoryBudget | None) -> tuple[bool, str]:
    """Whether to stream ``tree``, and why, in words."""
    if name == "imagenet":
        if stream == "no":
            raise UserError("--dataset imagenet is always streamed (its JPEGs differ in size, and decoded they "
                            "would not fit in memory); leave --data_path at auto or pass stream")
        return True, "imagenet is always streamed"
    if stream != "auto":
        return stream == "yes", f"--data_path {'stream' if stream == 'yes' else 'device/loader'}"
    width, height = _first_size(tree)
    count = len(tree.train_files) + len(tree.test_files)
    size = count * 3 * width * height
    decoded = f"{count:,} images of {width}x{height} take {size / 1e9:.2f} GB decoded"
    if budget is None:
        return False, decoded
    if size > budget.bytes:
        return True, f"{decoded}, over the memory budget of {budget.bytes / 1e9:.2f} GB: {budget.source}"
    return False, f"{decoded}, within the memory budget of {budget.bytes / 1e9:.2f} GB: {budget.source}"


def _first_size(tree: ImageTree) -> tuple[int, int]:
    """(width, height) of the tree's first training image, from its header alone."""
    path = tree.train_files[0]
    try:
        with Image.open(path) as image:
            return image.size
    # Pillow signals a bad file with several exception types.
    except Exception as err:
        raise UserError(f"Cannot read image {path}: it is missing, truncated or not an image file.") from err


def _file_split(root: str, files: list[str], labels: list[int]) -> FileSplit:
    """A ``FileSplit`` of ``files`` (absolute paths under ``root``) and their labels."""
    start = len(os.path.join(root, ""))
    relative = np.array([f[start:].encode() for f in files]) if files else np.array([], dtype="S1")
    return FileSplit(root, relative, torch.tensor(labels, dtype=torch.int64))
