"""The three types every data source produces and every consumer reads: ``DatasetInfo``, ``Split``, ``DataBundle``.

They live in their own small module so that the sources (``data_sources``, ``synthetic_data``), the
batch iterators (``batches``) and the entry point (``dataload``, which re-exports them) can all use them
without importing each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the normalisation need to know about a dataset."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]


@dataclass
class Split:
    """One split of a dataset: uint8 images ``(N, 3, H, W)`` (contiguous, CPU) and int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        """Number of samples in the split."""
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """All splits of one dataset; ``val`` is ``None`` unless a validation hold-out was requested.
    ``held_writes``: the decode-cache writes a read-only load put off (``write_held_cache`` runs them)."""

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split
    held_writes: list = field(default_factory=list, repr=False)

    def write_held_cache(self) -> None:
        """Write the decode cache a read-only load put off, once (a resume calls it when its checks passed)."""
        while self.held_writes:
            self.held_writes.pop(0)()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and standard deviation of uint8 ``(N, 3, H, W)`` images, on the [0, 1] scale."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    by_channel = images.transpose(0, 1).contiguous()
    means, stds = [], []
    for channel in by_channel:
        # A 256-bin histogram is exact and far cheaper than a float copy of the whole dataset.
        counts = torch.bincount(channel.view(-1), minlength=256).double()
        mean = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - mean) ** 2).sum() / counts.sum())
        means.append(mean)
        stds.append(max(var, 1e-12) ** 0.5)
    return tuple(means), tuple(stds)
