"""The types every data source produces and every consumer reads: ``DatasetInfo``, ``Split`` (decoded, in
memory), ``FileSplit`` (image files, decoded per batch: the streaming path), ``DataBundle``, and the
``ImageTree`` a folder of class folders is listed into.

They live in their own small module so that the sources (``data_sources``, ``streamed_sources``,
``synthetic_data``), the batch iterators (``batches``, ``image_stream``) and the entry point (``dataload``,
which re-exports them) can all use them without importing each other in a circle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
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

    def subset(self, index: torch.Tensor) -> Split:
        """A new split holding this split's samples at ``index``, in that order."""
        return Split(images=self.images[index].contiguous(), labels=self.labels[index].contiguous())


@dataclass
class FileSplit:
    """One split kept as image files under ``root``, decoded per batch (``image_stream``): the streaming path.

    ``files`` holds the paths relative to ``root`` as one numpy array of bytes rather than a list of str:
    DataLoader workers forked from the main process then share it, where a list's reference counts would
    make every worker copy the pages it touches (a million paths are about 100 MB).
    """

    root: str
    files: np.ndarray
    labels: torch.Tensor

    def __len__(self) -> int:
        """Number of images in the split."""
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        """The file of image ``i``."""
        return os.path.join(self.root, self.files[i].decode())

    def subset(self, index: torch.Tensor) -> FileSplit:
        """A new split holding this split's images at ``index``, in that order."""
        return FileSplit(self.root, self.files[index.numpy()], self.labels[index].contiguous())


@dataclass
class DataBundle:
    """All splits of one dataset; ``val`` is ``None`` unless a validation hold-out was requested.

    ``held`` says in words how the images are held and why (in memory, or streamed from their files);
    the console prints it among a run's first lines. ``held_writes``: the decode-cache writes a read-only
    load put off (``write_held_cache`` runs them).
    """

    info: DatasetInfo
    train: Split | FileSplit
    val: Split | FileSplit | None
    test: Split | FileSplit
    held: str = ""
    held_writes: list = field(default_factory=list, repr=False)

    @property
    def streamed(self) -> bool:
        """Whether the images stay in their files and are decoded per batch."""
        return isinstance(self.train, FileSplit)


    def write_held_cache(self) -> None:
        """Write the decode cache a read-only load put off, once (a resume calls it when its checks passed)."""
        while self.held_writes:
            self.held_writes.pop(0)()


@dataclass(frozen=True)
class ImageTree:
    """A folder of class folders, listed: the class names, and each split's image paths and labels, class by class."""

    root: str
    classes: tuple[str, ...]
    train_files: list[str]
    train_labels: list[int]
    test_files: list[str]
    test_labels: list[int]


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
