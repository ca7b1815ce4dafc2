"""Augmentation, normalisation and the batch iterators that feed training and evaluation.

Training batches are augmented either on the accelerator in one batched operation (``mode="device"``)
or by the classic torchvision per-image pipeline in a ``DataLoader`` (``mode="loader"``); both take
all of their randomness from a caller-owned CPU ``torch.Generator`` so a checkpointed generator state
reproduces an epoch exactly.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from PIL import Image

from dihkit.sources.data_types import DatasetInfo, Split
from dihkit.foundations.errors import UserError

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
    split: Split,
    info: DatasetInfo,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    mode: str = "device",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    padding: str = "zeros",
):
    """One epoch: yields (x float32 normalized on `device` NCHW, y int64 on device, idx int64 on device: the sample's index in `split`).

    Every random choice of the epoch (order, crops, flips) is drawn from the CPU ``generator`` when this
    function is called, so restoring the generator's state reproduces the epoch. ``mode="device"`` augments
    whole batches on ``device`` with ``augment_batch``; ``mode="loader"`` runs torchvision's RandomCrop,
    RandomHorizontalFlip, ToTensor and Normalize per image in a ``DataLoader`` with ``num_workers``; both pad
    the crops with ``padding`` (``PADDINGS``).
    With ``world_size > 1`` each rank gets a disjoint strided shard of the same permutation: the ranks
    must seed ``generator`` identically, and every rank makes the same draws so the generators stay in step.
    """
    if mode not in ("device", "loader"):
        raise UserError(f"Unknown data mode {mode!r}; choose 'device' or 'loader'.")
    if batch_size < 1:
        raise UserError(f"Batch size must be at least 1, got {batch_size}.")
    _check_shard(rank, world_size)
    device = torch.device(device)
    order = _epoch_order(len(split), batch_size, generator, rank, world_size)
    if mode == "device":
        # Crops and flips for all ranks' shards, of which each rank keeps its own stride: the same position
        # in different shards gets independent augmentation (and with one rank nothing changes).
        offsets, flips = draw_augment_params(len(order) * world_size, generator)
        offsets, flips = offsets[rank::world_size], flips[rank::world_size]
        return _device_batches(split, info, batch_size, device, order, offsets, flips, padding)
    epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return _loader_batches(split, info, batch_size, device, order, epoch_seed, num_workers, padding)


def _device_batches(split, info, batch_size, device, order, offsets, flips, padding):
    """Yield augmented batches gathered from the split's device copy in ``order``."""
    images, labels = _on_device(split, device)
    order, offsets, flips = order.to(device), offsets.to(device), flips.to(device)
    for start in range(0, len(order), batch_size):
        batch = slice(start, start + batch_size)
        idx = order[batch]
        yield augment_batch(images[idx], offsets[batch], flips[batch], info.mean, info.std, padding), labels[idx], idx


class _AugmentedImages(torch.utils.data.Dataset):
    """Per-image torchvision augmentation of a uint8 split, returning ``(x, y, idx)``.

    The transforms draw from torch's global RNG, so each sample reseeds it from the epoch seed and its
    index (restoring the previous state afterwards): results then do not depend on the number of workers
    or on anything else the caller's process does with the global RNG.
    """

    def __init__(self, split: Split, info: DatasetInfo, epoch_seed: int, padding: str = "zeros"):
        from torchvision import transforms

        self.images = split.images
        self.labels = split.labels
        self.epoch_seed = epoch_seed
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

    def __getitem__(self, idx: int):
        """The augmented image ``idx`` with its label and index."""
        picture = Image.fromarray(self.images[idx].permute(1, 2, 0).numpy())
        saved = torch.get_rng_state()
        # Mix the index into the seed with a large odd multiplier so neighbouring samples get unrelated streams.
        torch.default_generator.manual_seed((self.epoch_seed + idx * 0x9E3779B97F4A7C15) % 2**64)
        try:
            x = self.transform(picture)
        finally:
            torch.set_rng_state(saved)
        return x, self.labels[idx], idx


def _loader_batches(split, info, batch_size, device, order, epoch_seed, num_workers, padding):
    """Yield batches from a ``DataLoader`` that visits ``order`` with torchvision's per-image augmentation."""
    loader = torch.utils.data.DataLoader(
        _AugmentedImages(split, info, epoch_seed, padding),
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Seeds the workers from the epoch seed instead of consuming the caller's global RNG.
        generator=torch.Generator().manual_seed(epoch_seed),
    )
    for x, y, idx in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx.to(device, non_blocking=True)


def eval_batches(split: Split, info: DatasetInfo, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1):
    """Yields (x normalized, y, idx) in order, no augmentation; with world_size>1 each rank gets a disjoint contiguous-or-strided shard covering the split exactly once overall (no padding/duplicates).

    This implementation gives rank ``r`` the contiguous block ``[r*N//W, (r+1)*N//W)``.
    """
    if batch_size < 1:
        raise UserError(f"Batch size must be at least 1, got {batch_size}.")
    _check_shard(rank, world_size)
    device = torch.device(device)
    images, labels = _on_device(split, device)
    n = len(split)
    begin, end = rank * n // world_size, (rank + 1) * n // world_size
    for start in range(begin, end, batch_size):
        stop = min(start + batch_size, end)
        idx = torch.arange(start, stop, device=device)
        yield normalize(images[start:stop], info.mean, info.std), labels[start:stop], idx
