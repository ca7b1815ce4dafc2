"""Datasets held in memory as uint8 tensors: the one entry point the rest of the toolkit imports.

Every source (CIFAR, Tiny-ImageNet, a folder of images, a generated toy set) ends up as the same
``DataBundle`` of uint8 ``(N, 3, H, W)`` tensors, so the rest of the toolkit never sees file formats;
ImageNet, and an image folder too large for memory, stay files (``FileSplit``) decoded per batch, behind
the same batch iterators. This module chooses the source, holds out the validation split and the training
subset, makes labels noisy on request, and identifies the data a run used; the work itself lives in
modules named after what they hold:

- ``data_types``: ``DatasetInfo``, ``Split``, ``FileSplit``, ``DataBundle``;
- ``data_sources``: CIFAR-10/100, Tiny-ImageNet (with its download) and image-folder trees;
- ``image_trees``: ImageNet's layout, and whether a tree is held in memory or streamed (the memory budget);
- ``decode_cache``: decoding image files, and the optional cache of the decoded arrays;
- ``image_stream``: decoding and cropping one file per sample (the streaming path);
- ``synthetic_data``: the generated ``synthetic`` dataset;
- ``batches``: normalisation, augmentation and the training / evaluation batch iterators;
- ``normalization``: the published mean/std tables ``--normalization`` chooses from.

Every name callers use is importable from here (``dataload.train_batches``, ``dataload.Split``, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from contextlib import nullcontext

import torch

from dihkit.sources.batches import (PAD, PADDINGS, augment_batch, draw_augment_params, eval_batches, normalize,
                                    train_batches)
from dihkit.sources.data_sources import (CIFAR, cifar_info, load_cifar, load_imagefolder, load_tiny_imagenet,
                                         tiny_imagenet_info)
from dihkit.sources.data_types import DataBundle, DatasetInfo, FileSplit, Split
from dihkit.sources.decode_cache import default_cache_dir, writes_held
from dihkit.sources.normalization import NORMALIZATIONS, normalized
from dihkit.foundations.errors import UserError
from dihkit.sources.image_trees import TREES, MemoryBudget, load_image_tree, memory_budget
from dihkit.sources.synthetic_data import load_synthetic, synthetic_info

__all__ = [
    "DATASET_NAMES", "NORMALIZATIONS", "PAD", "PADDINGS", "DataBundle", "DatasetInfo", "FileSplit", "MemoryBudget",
    "Split", "augment_batch", "data_fingerprint", "default_cache_dir", "draw_augment_params", "eval_batches",
    "known_info", "load_data", "memory_budget", "normalize", "normalized", "train_batches",
]

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "imagenet", "synthetic")

_VAL_SEED = 0
_SUBSET_SEED = 1
_NOISE_SEED = 2
# Pixels sampled by data_fingerprint: enough to tell datasets apart, few enough to hash in milliseconds.
_FINGERPRINT_SAMPLES = 1 << 22


def load_data(name: str, data_dir: str, val_size: int = 0, download: bool = True, train_subset: int = 0,
              *, cache_dir: str | os.PathLike | None = None, stream: str = "auto", crop_size: int | None = None,
              budget: MemoryBudget | None = None, cache_read_only: bool = False,
              label_noise: float = 0.0) -> DataBundle:
    """Load dataset ``name`` from ``data_dir``, optionally holding out ``val_size`` training samples.

    ``download`` allows fetching CIFAR or Tiny-ImageNet when they are missing. The validation split is
    class-balanced and drawn with a fixed seed, so it is the same for every run seed and every method.
    ``train_subset`` > 0 then keeps a class-balanced subset of that many training samples (smoke tests,
    budgets), also by a fixed seed. ``label_noise`` then gives that fraction of the training images a wrong
    label (``noisy_labels``). ``cache_dir`` keeps the decoded images of Tiny-ImageNet and image
    folders there (see ``default_cache_dir``) so the next load skips decoding; ``None`` writes no cache.
    ImageNet and image folders are streamed (``image_trees``): always for ImageNet, for an image folder when
    ``stream`` is ``"yes"``, or ``"auto"`` and its decoded images exceed ``budget``; ``crop_size`` is then
    the streamed crop. The bundle's ``held`` says how the images are held and why.
    ``cache_read_only`` reads a cache but writes none: the bundle holds the write (``write_held_cache``).
    """
    if name not in DATASET_NAMES:
        raise UserError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
    if val_size < 0:
        raise UserError(f"val_size must be zero or positive, got {val_size}.")
    if train_subset < 0:
        raise UserError(f"--train_subset must be zero or positive, got {train_subset}.")
    if name not in TREES and (stream == "yes" or crop_size is not None):
        raise UserError(f"{'--data_path stream' if stream == 'yes' else '--crop_size'} is for image files "
                        f"streamed per batch, and {name} is held in memory; use it with --dataset imagenet or "
                        f"imagefolder")
    held = ""
    with writes_held() if cache_read_only else nullcontext([]) as writes:
        if name in CIFAR:
            info, train, test = load_cifar(name, data_dir, download)
        elif name == "tiny-imagenet":
            info, train, test = load_tiny_imagenet(data_dir, download, cache_dir)
        elif name in TREES:
            info, train, test, held = load_image_tree(name, data_dir, cache_dir, stream, crop_size, budget)
        else:
            info, train, test = load_synthetic()
    train, val = _hold_out(train, info.num_classes, val_size)
    train = noisy_labels(_train_subset(train, info.num_classes, train_subset), info.num_classes, label_noise)
    return DataBundle(info=info, train=train, val=val, test=test, held=held or _in_memory(train, test),
                      held_writes=writes)


def _in_memory(train: Split, test: Split) -> str:
    """How a dataset held in memory is held, in words."""
    count, (height, width) = len(train) + len(test), train.images.shape[-2:]
    return f"in memory ({count:,} images of {width}x{height})"


def known_info(name: str) -> DatasetInfo | None:
    """The ``DatasetInfo`` of built-in dataset ``name`` without touching the disk; ``None`` for ``imagefolder``.

    Enough to build a model (``--summary``) before any data is downloaded. CIFAR's class names are the
    published ones; Tiny-ImageNet's ``classes`` is empty because its wnids come from the dataset's own
    wnids.txt. For ``synthetic`` the result equals what ``load_data`` returns. An image folder's classes,
    size and statistics depend on its files, as an ImageNet folder's classes (its wnid folders) and crop
    do, and an unknown name has no info: all give ``None``.
    """
    if name in CIFAR:
        return cifar_info(name)
    if name == "tiny-imagenet":
        return tiny_imagenet_info()
    if name == "synthetic":
        return synthetic_info()
    return None


def data_fingerprint(bundle: DataBundle) -> str:
    """A cheap identity (40 hex digits) of the training and validation data a run uses.

    Hashes the dataset's name and classes, each split's shape and labels, and a fixed strided sample of
    its pixels that touches every image. Another data folder or changed contents, another
    ``train_subset`` or ``val_size`` all give another value; loading the same data again gives the
    same one. Takes milliseconds for CIFAR's 50k images, so a resume can afford to check it. A streamed
    split is identified by its files' names and labels (and the crop, in ``info``): a file replaced under
    the same name keeps the value.
    """
    info = bundle.info
    digest = hashlib.sha1(b"dih data fingerprint 1\n")
    digest.update(f"{info.name}\n{info.num_classes}\n{info.image_size}\n{info.classes!r}\n".encode())
    for role, split in (("train", bundle.train), ("val", bundle.val)):
        if split is None:
            digest.update(f"{role}: none\n".encode())
            continue
        streamed = isinstance(split, FileSplit)
        digest.update(f"{role}: {f'{len(split)} files' if streamed else tuple(split.images.shape)}\n".encode())
        digest.update(split.labels.to(torch.int64).contiguous().numpy().tobytes())
        # Streamed: the files' names, not their pixels (reading a million files would take minutes).
        digest.update(b"\n".join(split.files.tolist()) if streamed else _pixel_sample(split.images).numpy().tobytes())
    return digest.hexdigest()


def _pixel_sample(images: torch.Tensor) -> torch.Tensor:
    """About ``_FINGERPRINT_SAMPLES`` bytes of ``images`` at a fixed odd stride, at least 16 from every image.

    The odd stride walks through every offset within an image over the dataset rather than hitting the
    same pixel of each one, and capping it below an image's size means no image goes unsampled.
    """
    flat = images.contiguous().view(-1)
    if flat.numel() == 0:
        return flat
    per_image = flat.numel() // max(len(images), 1)
    step = max(1, min(flat.numel() // _FINGERPRINT_SAMPLES, per_image // 16)) | 1
    return flat[::step].contiguous()


# ----------------------------------------------------------------------------------------------------
# Validation hold-out and training subset


def _hold_out(train: Split, num_classes: int, val_size: int) -> tuple[Split, Split | None]:
    """Move ``val_size // num_classes`` random samples of every class from ``train`` into a validation split."""
    if val_size == 0:
        return train, None
    keep, held = _split_per_class(train, num_classes, val_size, "--val_size", _VAL_SEED)
    return train.subset(keep), train.subset(held)


def _train_subset(train: Split, num_classes: int, size: int) -> Split:
    """A class-balanced random subset of ``size`` training samples (``size // num_classes`` per class)."""
    if size == 0:
        return train
    _, chosen = _split_per_class(train, num_classes, size, "--train_subset", _SUBSET_SEED)
    return train.subset(chosen.sort().values)


def noisy_labels(train: Split, num_classes: int, fraction: float) -> Split:
    """``train`` with ``round(fraction * N)`` of its samples relabelled, each to one of the other classes drawn
    uniformly: exactly that fraction of the labels is wrong. A private fixed-seed generator picks the samples
    and their labels, so they are the same for every run seed and every method."""
    wrong = round(fraction * len(train))
    if wrong == 0:
        return train
    generator = torch.Generator().manual_seed(_NOISE_SEED)
    picked = torch.randperm(len(train), generator=generator)[:wrong]
    labels = train.labels.clone()
    shift = torch.randint(1, num_classes, (wrong,), generator=generator).to(labels.dtype)
    labels[picked] = (labels[picked] + shift) % num_classes
    return dataclasses.replace(train, labels=labels)   # the same images (in memory or files), new labels


def _split_per_class(train: Split, num_classes: int, size: int, flag: str, seed: int):
    """Indices of the samples left over and of ``size // num_classes`` picked per class, by a fixed seed."""
    if size % num_classes:
        raise UserError(f"{flag} {size} must be a multiple of the number of classes ({num_classes}).")
    per_class = size // num_classes
    counts = torch.bincount(train.labels, minlength=num_classes)
    smallest = int(counts.min())
    if per_class > smallest - 1:
        raise UserError(
            f"{flag} {size} asks for {per_class} images per class, but the smallest class has only"
            f" {smallest} training images and must keep at least one; use at most {num_classes * max(smallest - 1, 0)}."
        )
    # A private fixed-seed generator makes the choice identical for every run seed and every method.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    by_class = order[torch.argsort(train.labels[order], stable=True)]
    first_of_class = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(train)) - first_of_class.repeat_interleave(counts)
    chosen = torch.zeros(len(train), dtype=torch.bool)
    chosen[by_class[rank_in_class < per_class]] = True
    return (~chosen).nonzero().squeeze(1), chosen.nonzero().squeeze(1)


