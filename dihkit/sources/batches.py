"""Augmentation, normalisation and the batch iterators that feed training and evaluation.

Training batches of data held in memory are augmented either on the accelerator in one batched operation
(``mode="device"``) or by the classic torchvision per-image pipeline in a ``DataLoader``
(``mode="loader"``); streamed data (a ``FileSplit``) is decoded and cropped per image in a ``DataLoader``
(``mode="stream"``, ``image_stream``). All take their randomness from a caller-owned CPU
``torch.Generator`` so a checkpointed generator state reproduces an epoch exactly.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from PIL import Image

from dihkit.sources.data_types import DatasetInfo, FileSplit, Split
from dihkit.sources.image_stream import StreamedImages, seeded
from dihkit.foundations.errors import UserError

MODES = ("device", "loader", "stream")

PAD = 4
"""Pixels of padding around each image before the random crop (the CIFAR recipe)."""
# ``--crop_padding``: zeros (torchvision's RandomCrop default) or the image mirrored at its border (padding_mode
# "reflect", the DIH authors' code after "Hyperparameters tuning"); the name F.pad gives each.
PADDINGS = {"zeros": "constant", "reflect": "reflect"}

@functools.lru_cache(maxsize=None)
def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel constants ``(C, 1, 1)`` float32 on ``device``, made once per device.

    Building them per batch would copy host data to the device every batch, which on CUDA waits for
    the device to finish its queued work.
    """
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def normalize(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` to float32 on the same device, scaled to [0, 1] then standardised per channel."""
    x = images_uint8.float().div_(255.0)
    mean_t = _channel_constants(tuple(map(float, mean)), x.device)
    std_t = _channel_constants(tuple(map(float, std)), x.device)
    # Subtract-then-divide in the same order as torchvision's Normalize so the two pipelines agree bit for bit.
    return x.sub_(mean_t).div_(std_t)


def draw_augment_params(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw crop offsets ``(n, 2)`` int64 (top, left) uniform in [0, 2*PAD] and flips ``(n,)`` bool, on CPU."""
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets, flips


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, mean, std,
                  padding: str = "zeros") -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a uint8 batch ``(B, 3, H, W)``, then ``normalize``.

    Image ``b`` is padded by ``PAD`` pixels (``padding``: zeros, or reflect, the border mirrored without
    repeating the edge pixel), cropped back to ``H x W`` with its top-left corner at ``offsets[b] = (top, left)``
    of the padded image, and mirrored left-right where ``flips[b]``; this is exactly torchvision's
    ``RandomCrop(H, padding=PAD, padding_mode=...)`` followed by ``RandomHorizontalFlip``. Works on any device;
    ``offsets`` and ``flips`` are moved to the images' device.
    """
    b, c, h, w = images.shape
    device = images.device
    offsets = offsets.to(device=device, dtype=torch.long)
    flips = flips.to(device=device, dtype=torch.bool)
    padded = F.pad(images, (PAD, PAD, PAD, PAD), mode=PADDINGS[padding])
    rows = offsets[:, 0:1] + torch.arange(h, device=device)
    cols = offsets[:, 1:2] + torch.arange(w, device=device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    cropped = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
    return normalize(cropped, mean, std)


# ----------------------------------------------------------------------------------------------------
# Batch iterators

# Device copies of splits, keyed by (id(split), device); an entry dies with its split.
_DEVICE_COPIES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _on_device(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``split``'s images and labels on ``device``, copied at most once per split object and device."""
    key = (id(split), str(device))
    entry = _DEVICE_COPIES.get(key)
    if entry is not None and entry[0] is split.images and entry[1] is split.labels:
        return entry[2], entry[3]
    if entry is None:
        weakref.finalize(split, _DEVICE_COPIES.pop, key, None)
    images, labels = split.images.to(device), split.labels.to(device)
    _DEVICE_COPIES[key] = (split.images, split.labels, images, labels)
    return images, labels


def _check_shard(rank: int, world_size: int) -> None:
    """Reject an impossible rank / world size pair (a programming error, not a user one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not valid for world_size {world_size}")


def _epoch_order(n: int, batch_size: int, generator: torch.Generator, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample indices for one epoch: a strided shard of a fresh permutation, equal length on all ranks."""
    perm = torch.randperm(n, generator=generator)
    shard = perm[rank::world_size][: n // world_size]
    # Batch norm cannot train on a single sample, so a lone straggler is dropped (the same on every rank).
    if batch_size > 1 and len(shard) % batch_size == 1:
        shard = shard[:-1]
    return shard


def train_batches(
    split: Split | FileSplit,
    info: DatasetInfo,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    mode: str = "device",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    padding: str = "zeros",
    *,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    skip: int = 0,
):
    """One epoch: yields (x float32 normalized on `device` NCHW, y int64 on device, idx int64 on device: the sample's index in `split`).

    Every random choice of the epoch (order, crops, flips) is drawn from the CPU ``generator`` when this
    function is called, so restoring the generator's state reproduces the epoch; ``skip`` then leaves out
    the epoch's first batches (a resumed epoch) without making them. ``mode="device"`` augments whole
    batches on ``device`` with ``augment_batch``; ``mode="loader"`` runs torchvision's RandomCrop,
    RandomHorizontalFlip, ToTensor and Normalize per image in a ``DataLoader`` with ``num_workers``;
    ``mode="stream"`` (a ``FileSplit``, and only then) decodes and crops each file in the loader's workers.
    The device and loader modes pad the 4-pixel crops with ``padding`` (``PADDINGS``).
    With ``world_size > 1`` each rank gets a disjoint strided shard of the same permutation: the ranks
    must seed ``generator`` identically, and every rank makes the same draws so the generators stay in step.
    """
    if mode not in MODES:
        raise UserError(f"Unknown data mode {mode!r}; choose one of {', '.join(MODES)}.")
    if isinstance(split, FileSplit) != (mode == "stream"):
        raise ValueError(f"mode {mode!r} does not fit a {type(split).__name__}: streamed splits use 'stream'")
    if batch_size < 1:
        raise UserError(f"Batch size must be at least 1, got {batch_size}.")
    _check_shard(rank, world_size)
    device = torch.device(device)
    order = _epoch_order(len(split), batch_size, generator, rank, world_size)
    start = skip * batch_size
    if mode == "device":
        # Crops and flips for all ranks' shards, of which each rank keeps its own stride: the same position
        # in different shards gets independent augmentation (and with one rank nothing changes).
        offsets, flips = draw_augment_params(len(order) * world_size, generator)
        offsets, flips = offsets[rank::world_size][start:], flips[rank::world_size][start:]
        return _device_batches(split, info, batch_size, device, order[start:], offsets, flips, padding)
    epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    loader = _loader(split, info, True, batch_size, device, num_workers, prefetch_factor, persistent_workers,
                     padding)
    return _loader_batches(loader, order[start:], epoch_seed, split, info, device)


def _device_batches(split, info, batch_size, device, order, offsets, flips, padding):
    """Yield augmented batches gathered from the split's device copy in ``order``."""
    images, labels = _on_device(split, device)
    order, offsets, flips = order.to(device), offsets.to(device), flips.to(device)
    for start in range(0, len(order), batch_size):
        batch = slice(start, start + batch_size)
        idx = order[batch]
        yield augment_batch(images[idx], offsets[batch], flips[batch], info.mean, info.std, padding), labels[idx], idx


class _AugmentedImages(torch.utils.data.Dataset):
    """Per-image torchvision augmentation of a uint8 split: key ``(index, epoch_seed)`` -> ``(x, y, index, ok)``.

    The transforms draw from torch's global RNG, reseeded per sample from the epoch seed and the index
    (``image_stream.seeded``): results then do not depend on the number of workers or on anything else the
    caller's process does with the global RNG. ``ok`` is always true (the images are already decoded).
    """

    def __init__(self, split: Split, info: DatasetInfo, padding: str = "zeros"):
        from torchvision import transforms

        self.images = split.images
        self.labels = split.labels
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(info.image_size, padding=PAD, padding_mode=PADDINGS[padding]),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(info.mean, info.std),
            ]
        )

    def __len__(self) -> int:
        """Number of images in the underlying split."""
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]):
        """The augmented image ``key[0]`` with its label and index."""
        idx, epoch_seed = key
        picture = Image.fromarray(self.images[idx].permute(1, 2, 0).numpy())
        with seeded(epoch_seed, idx):
            x = self.transform(picture)
        return x, self.labels[idx], idx, True


class _EpochKeys(torch.utils.data.Sampler):
    """The keys ``(index, epoch_seed)`` a loader visits, replaced before each pass (``set_epoch``).

    A persistent loader keeps its sampler, so a new epoch only replaces the indices; the seed travels with
    each index, so the workers need not be told that an epoch began. The keys are made as the loader asks
    for them: a million tuples per epoch would hold about 100 MB.
    """

    def __init__(self):
        self.indices, self.seed = torch.zeros(0, dtype=torch.long), 0

    def set_epoch(self, indices: torch.Tensor, seed: int) -> None:
        """The sample indices of the next pass, in order, and their epoch's seed."""
        self.indices, self.seed = indices, seed

    def __iter__(self):
        return ((int(i), self.seed) for i in self.indices.numpy())

    def __len__(self) -> int:
        return len(self.indices)


# Persistent loaders, keyed by (id(split), training?, batch size, loader settings, device type); an entry dies
# with its split, and its workers with it.
_LOADERS: dict[tuple, tuple[weakref.ref, torch.utils.data.DataLoader]] = {}


def _loader(split, info, train: bool, batch_size: int, device: torch.device, workers: int, prefetch: int,
            persistent: bool, padding: str = "zeros") -> torch.utils.data.DataLoader:
    """The DataLoader of ``split`` for these settings: made once when its workers persist, else for this pass."""
    persistent = persistent and workers > 0
    key = (id(split), train, batch_size, workers, prefetch, persistent, padding, device.type)
    entry = _LOADERS.get(key)
    if entry is not None and entry[0]() is split:
        return entry[1]
    if isinstance(split, FileSplit):
        dataset = StreamedImages(split, info.image_size, train)
    else:
        dataset = _AugmentedImages(split, info, padding)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_EpochKeys(), num_workers=workers,
        prefetch_factor=prefetch if workers else None, persistent_workers=persistent,
        pin_memory=device.type == "cuda",
        # The workers' base seed is drawn from this generator, never from the caller's global RNG.
        generator=torch.Generator().manual_seed(0),
    )
    if persistent:
        _LOADERS[key] = (weakref.ref(split), loader)
        weakref.finalize(split, _LOADERS.pop, key, None)
    return loader


def unreadable(split: FileSplit, index: int) -> UserError:
    """The error of an image file that cannot be decoded in the middle of a pass."""
    return UserError(f"Cannot read image {split.path(index)}: it is missing, truncated or not an image file; "
                     f"replace it with a readable copy under the same name and rerun with --resume (it continues "
                     f"from the last finished epoch, if any), or remove it and start over")


def _loader_batches(loader, indices: torch.Tensor, seed: int, split, info: DatasetInfo, device: torch.device):
    """Yield the batches of ``loader`` visiting ``indices`` with the epoch's ``seed``, on ``device`` and
    normalized; stop at an unreadable file."""
    loader.sampler.set_epoch(indices, seed)
    for x, y, idx, ok in loader:
        if not ok.all():
            raise unreadable(split, int(idx[~ok][0]))
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            # Streamed crops arrive as uint8 (B, H, W, 3), a quarter of float32's bytes to move; the layout
            # change and the normalisation run on the device.
            x = normalize(x.permute(0, 3, 1, 2).contiguous(), info.mean, info.std)
        yield x, y.to(device, non_blocking=True), idx.to(device, non_blocking=True)


def eval_batches(split: Split | FileSplit, info: DatasetInfo, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, *, num_workers: int = 0, prefetch_factor: int = 2,
                 persistent_workers: bool = False):
    """Yields (x normalized, y, idx) in order, no augmentation; with world_size>1 each rank gets a disjoint contiguous-or-strided shard covering the split exactly once overall (no padding/duplicates).

    This implementation gives rank ``r`` the contiguous block ``[r*N//W, (r+1)*N//W)``. A streamed split
    is decoded and centre-cropped by a DataLoader with the given worker settings (``image_stream``).
    """
    if batch_size < 1:
        raise UserError(f"Batch size must be at least 1, got {batch_size}.")
    _check_shard(rank, world_size)
    device = torch.device(device)
    n = len(split)
    begin, end = rank * n // world_size, (rank + 1) * n // world_size
    if isinstance(split, FileSplit):
        loader = _loader(split, info, False, batch_size, device, num_workers, prefetch_factor, persistent_workers)
        yield from _loader_batches(loader, torch.arange(begin, end), 0, split, info, device)
        return
    images, labels = _on_device(split, device)
    for start in range(begin, end, batch_size):
        stop = min(start + batch_size, end)
        idx = torch.arange(start, stop, device=device)
        yield normalize(images[start:stop], info.mean, info.std), labels[start:stop], idx
