"""Datasets held in memory as uint8 tensors, and the batch iterators that feed training and evaluation.

Every source (CIFAR, Tiny-ImageNet, a folder of images, a generated toy set) ends up as the same
``DataBundle`` of uint8 ``(N, 3, H, W)`` tensors, so the rest of the toolkit never sees file formats.
Training batches are augmented either on the accelerator in one batched operation (``mode="device"``)
or by the classic torchvision per-image pipeline in a ``DataLoader`` (``mode="loader"``); both take
all of their randomness from a caller-owned CPU ``torch.Generator`` so a checkpointed generator state
reproduces an epoch exactly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import weakref
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from errors import UserError

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "synthetic")

PAD = 4
"""Pixels of zero padding around each image before the random crop (the CIFAR recipe)."""

_CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_TINY_MEAN = (0.4802, 0.4481, 0.3975)
_TINY_STD = (0.2770, 0.2691, 0.2821)

_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_CACHE_NAME = ".dataload-cache.npz"
# Bumped whenever the cache layout changes, so an old file is rebuilt rather than misread.
_CACHE_VERSION = "1"

_VAL_SEED = 0
_SUBSET_SEED = 1


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
    """All splits of one dataset; ``val`` is ``None`` unless a validation hold-out was requested."""

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split


# ----------------------------------------------------------------------------------------------------
# Loading


def load_data(name: str, data_dir: str, val_size: int = 0, download: bool = True,
              train_subset: int = 0) -> DataBundle:
    """Load dataset ``name`` from ``data_dir`` into memory, optionally holding out ``val_size`` training samples.

    ``download`` allows fetching CIFAR or Tiny-ImageNet when they are missing. The validation split is
    class-balanced and drawn with a fixed seed, so it is the same for every run seed and every method.
    ``train_subset`` > 0 then keeps a class-balanced subset of that many training samples (smoke tests,
    budgets), also by a fixed seed.
    """
    if name not in DATASET_NAMES:
        raise UserError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
    if val_size < 0:
        raise UserError(f"val_size must be zero or positive, got {val_size}.")
    if name in _CIFAR:
        info, train, test = _load_cifar(name, data_dir, download)
    elif name == "tiny-imagenet":
        info, train, test = _load_tiny_imagenet(data_dir, download)
    elif name == "imagefolder":
        info, train, test = _load_imagefolder(data_dir)
    else:
        info, train, test = _load_synthetic()
    train, val = _hold_out(train, info.num_classes, val_size)
    if train_subset < 0:
        raise UserError(f"--train_subset must be zero or positive, got {train_subset}.")
    train = _train_subset(train, info.num_classes, train_subset)
    return DataBundle(info=info, train=train, val=val, test=test)


def _split_from_hwc(images: np.ndarray, labels) -> Split:
    """Wrap channel-last uint8 images and labels as a channel-first ``Split``."""
    chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return Split(images=chw, labels=torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _load_cifar(name: str, data_dir: str, download: bool) -> tuple[DatasetInfo, Split, Split]:
    """Read CIFAR-10/100 through torchvision's own dataset classes, downloading only when allowed."""
    from torchvision.datasets import CIFAR10, CIFAR100

    spec = _CIFAR[name]
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    where = (
        f"{spec['title']} is not in {data_dir}"
        f" and {{why}}; place the extracted '{spec['folder']}' folder from {spec['url']} there."
    )
    try:
        train = cls(root=data_dir, train=True, download=False)
    except (RuntimeError, OSError) as missing:
        if not download:
            raise UserError(where.format(why="downloading is turned off")) from missing
        try:
            train = cls(root=data_dir, train=True, download=True)
        # The network, the archive checksum or the extraction can each fail in its own way;
        # all mean the same to the user.
        except Exception as failed:
            raise UserError(where.format(why="could not be downloaded")) from failed
    try:
        test = cls(root=data_dir, train=False, download=False)
    except (RuntimeError, OSError) as missing:
        raise UserError(where.format(why="its test batch is missing or corrupted")) from missing
    classes = tuple(str(c) for c in train.classes)
    info = DatasetInfo(
        name=name,
        num_classes=len(classes),
        image_size=32,
        mean=spec["mean"],
        std=spec["std"],
        classes=classes,
    )
    return info, _split_from_hwc(train.data, train.targets), _split_from_hwc(test.data, test.targets)


def _load_tiny_imagenet(data_dir: str, download: bool) -> tuple[DatasetInfo, Split, Split]:
    """Read Tiny-ImageNet's train folders and its labelled val set (used as the test split)."""
    root = Path(data_dir) / _TINY_FOLDER
    if not root.is_dir():
        _fetch_tiny_imagenet(data_dir, download)
    wnids_file = root / "wnids.txt"
    annotations = root / "val" / "val_annotations.txt"
    for needed in (wnids_file, annotations):
        if not needed.is_file():
            raise UserError(f"Tiny-ImageNet folder {root} is incomplete: {needed} is missing.")
    wnids = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
    if not wnids:
        raise UserError(f"{wnids_file} lists no classes.")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}

    train_files: list[str] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        files = _image_files(folder) if folder.is_dir() else []
        if not files:
            raise UserError(f"Tiny-ImageNet class {wnid} has no training images in {folder}.")
        train_files += files
        train_labels += [label_of[wnid]] * len(files)

    test_files: list[str] = []
    test_labels: list[int] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserError(f"{annotations} line {number} does not name a file and a known wnid.")
        test_files.append(os.path.join(root, "val", "images", fields[0]))
        test_labels.append(label_of[fields[1]])
    if not test_files:
        raise UserError(f"{annotations} lists no validation images.")
    order = sorted(range(len(test_files)), key=test_files.__getitem__)
    test_files = [test_files[i] for i in order]
    test_labels = [test_labels[i] for i in order]

    train, test = _decode_splits(root, train_files, train_labels, test_files, test_labels, tuple(wnids))
    if train.images.shape[-1] != 64:
        raise UserError(f"Tiny-ImageNet images in {root} must be 64x64, found {train.images.shape[-1]}px.")
    info = DatasetInfo(
        name="tiny-imagenet",
        num_classes=len(wnids),
        image_size=64,
        mean=_TINY_MEAN,
        std=_TINY_STD,
        classes=tuple(wnids),
    )
    return info, train, test


def _fetch_tiny_imagenet(data_dir: str, download: bool) -> None:
    """Download and unpack the official Tiny-ImageNet archive into ``data_dir`` or explain what to do."""
    advice = f"place the extracted '{_TINY_FOLDER}' folder from {_TINY_URL} there."
    if not download:
        raise UserError(f"Tiny-ImageNet is not in {data_dir} and downloading is turned off; {advice}")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(_TINY_URL, download_root=data_dir, md5=_TINY_MD5)
    # As for CIFAR: whichever step failed, the remedy for the user is the same.
    except Exception as failed:
        raise UserError(f"Tiny-ImageNet is not in {data_dir} and could not be downloaded; {advice}") from failed
    if not (Path(data_dir) / _TINY_FOLDER).is_dir():
        raise UserError(f"The Tiny-ImageNet archive did not contain a '{_TINY_FOLDER}' folder; {advice}")


def _load_imagefolder(data_dir: str) -> tuple[DatasetInfo, Split, Split]:
    """Read ``data_dir/{train,test}/<class>/<image>``; size and normalisation come from the images."""
    root = Path(data_dir)
    train_root, test_root = root / "train", root / "test"
    for folder in (train_root, test_root):
        if not folder.is_dir():
            raise UserError(f"Image folder dataset needs {folder} with one subfolder per class.")
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train_root} contains no class subfolders.")
    test_classes = sorted(p.name for p in test_root.iterdir() if p.is_dir())
    if test_classes != classes:
        raise UserError(
            f"{test_root} must have the same class folders as {train_root}"
            f" ({len(classes)} there, {len(test_classes)} here, or different names)."
        )

    def gather(split_root: Path, require_each: bool) -> tuple[list[str], list[int]]:
        files: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            found = _image_files(split_root / cls)
            if require_each and not found:
                raise UserError(f"Class folder {split_root / cls} contains no images.")
            files += found
            labels += [label] * len(found)
        return files, labels

    train_files, train_labels = gather(train_root, require_each=True)
    test_files, test_labels = gather(test_root, require_each=False)
    if not test_files:
        raise UserError(f"{test_root} contains no images.")
    train, test = _decode_splits(root, train_files, train_labels, test_files, test_labels, tuple(classes))
    mean, std = _channel_stats(train.images)
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        image_size=int(train.images.shape[-1]),
        mean=mean,
        std=std,
        classes=tuple(classes),
    )
    return info, train, test


def _image_files(folder: Path) -> list[str]:
    """Paths of the image files directly inside ``folder``, by name, skipping anything without an image extension.

    Plain strings rather than ``Path`` objects: with 100k files, pathlib's overhead costs seconds.
    """
    with os.scandir(folder) as entries:
        return sorted(
            e.path for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTENSIONS
        )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
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


# ----------------------------------------------------------------------------------------------------
# Decoding image files, with an on-disk cache of the result


def _decode_splits(
    root: Path,
    train_files: list[str],
    train_labels: list[int],
    test_files: list[str],
    test_labels: list[int],
    classes: tuple[str, ...],
) -> tuple[Split, Split]:
    """Decode both splits' image files, reusing ``root``'s cache when it matches the current file list."""
    files = train_files + test_files
    key = _cache_key(root, files, train_labels + test_labels, classes, len(train_files))
    cache = root / _CACHE_NAME
    cached = _read_cache(cache, key, len(files))
    if cached is not None:
        return cached
    images = _decode_files(files)
    n_train = len(train_files)
    train = Split(torch.from_numpy(images[:n_train]), torch.tensor(train_labels, dtype=torch.int64))
    test = Split(torch.from_numpy(images[n_train:]), torch.tensor(test_labels, dtype=torch.int64))
    _write_cache(cache, key, len(files), train, test)
    return train, test


def _cache_key(root: Path, files: list[str], labels: list[int], classes: tuple[str, ...], n_train: int) -> str:
    """A digest of everything the decoded arrays depend on: names, sizes, modification times and labels."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\n{n_train}\n{classes}\n".encode())
    # Relative names keep the cache valid when the whole data folder is moved.
    prefix = len(str(root)) + 1
    for path, label in zip(files, labels):
        # Sizes and mtimes catch an image replaced under the same name; one stat per file is cheap next to decoding.
        try:
            stat = os.stat(path)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path[prefix:]}\t{label}\t{stamp}\n".encode())
    return digest.hexdigest()


def _read_cache(cache: Path, key: str, count: int) -> tuple[Split, Split] | None:
    """The cached splits if ``cache`` exists and was built from the same files, else ``None``."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) != key or int(stored["count"]) != count:
                return None
            train = Split(torch.from_numpy(stored["train_images"]), torch.from_numpy(stored["train_labels"]))
            test = Split(torch.from_numpy(stored["test_images"]), torch.from_numpy(stored["test_labels"]))
    # A truncated or foreign file is just a stale cache: rebuild it instead of failing the run.
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return train, test


def _write_cache(cache: Path, key: str, count: int, train: Split, test: Split) -> None:
    """Store decoded splits next to the data; silently skipped where the folder is not writable."""
    try:
        handle, temp_name = tempfile.mkstemp(prefix=".dataload-", suffix=".tmp", dir=cache.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(
                out,
                key=np.array(key),
                count=np.array(count),
                train_images=train.images.numpy(),
                train_labels=train.labels.numpy(),
                test_images=test.images.numpy(),
                test_labels=test.labels.numpy(),
            )
        # Readers never see a half-written cache because the rename is atomic.
        os.replace(temp_name, cache)
    except OSError:
        Path(temp_name).unlink(missing_ok=True)


def _read_image(path: str) -> np.ndarray:
    """One image file as an RGB uint8 ``(H, W, 3)`` array; ``UserError`` naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    # Pillow signals bad files with several exception types (OSError, ValueError, SyntaxError, decompression bombs).
    except Exception as err:
        raise UserError(f"Cannot read image {path}: it is missing, truncated or not an image file.") from err


def _decode_files(files: list[str]) -> np.ndarray:
    """Decode all ``files`` into one uint8 ``(N, 3, S, S)`` array; every image must have the same square size."""
    first = _read_image(files[0])
    shape = first.shape
    out = np.empty((len(files), 3, shape[0], shape[1]), dtype=np.uint8)
    odd: dict[int, tuple[int, ...]] = {}

    def decode_chunk(start: int, stop: int) -> dict[int, tuple[int, ...]]:
        mismatched = {}
        for i in range(start, stop):
            pixels = first if i == 0 else _read_image(files[i])
            if pixels.shape != shape:
                mismatched[i] = pixels.shape
                continue
            out[i] = pixels.transpose(2, 0, 1)
        return mismatched

    # Pillow releases the GIL while decoding, so threads give real parallelism without pickling arrays around.
    workers = min(8, os.cpu_count() or 1)
    chunk = max(1, -(-len(files) // (workers * 4)))
    bounds = [(s, min(s + chunk, len(files))) for s in range(0, len(files), chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for mismatched in pool.map(lambda b: decode_chunk(*b), bounds):
            odd.update(mismatched)

    if odd:
        # Blame the files that disagree with the majority, not whichever file happened to come first.
        sizes = Counter(odd.values())
        sizes[shape] = len(files) - len(odd)
        common = sizes.most_common(1)[0][0]
        culprit = next(i for i in range(len(files)) if odd.get(i, shape) != common)
        got = odd.get(culprit, shape)
        raise UserError(
            f"Image {files[culprit]} is {got[1]}x{got[0]} but most images are {common[1]}x{common[0]}; all must match."
        )
    if shape[0] != shape[1]:
        raise UserError(f"Images must be square, but {files[0]} and the others are {shape[1]}x{shape[0]}.")
    return out


# ----------------------------------------------------------------------------------------------------
# The generated toy dataset

_SYN_SHAPES = ("circle", "square", "triangle", "cross", "ring")
_SYN_COLOURS = {"red": (0.85, 0.18, 0.15), "green": (0.2, 0.72, 0.22), "blue": (0.17, 0.32, 0.88)}
_SYN_TEXTURES = ("solid", "striped", "checked")
# Each shape, colour and texture is shared by several classes, so only their combination identifies one.
_SYN_CLASSES = (
    ("circle", "red", "solid"),
    ("circle", "blue", "striped"),
    ("square", "green", "striped"),
    ("square", "red", "checked"),
    ("triangle", "blue", "checked"),
    ("triangle", "green", "solid"),
    ("cross", "red", "striped"),
    ("cross", "green", "checked"),
    ("ring", "blue", "solid"),
    ("ring", "red", "striped"),
)
_SYN_SIZE = 32
_SYN_TRAIN_PER_CLASS = 500
_SYN_TEST_PER_CLASS = 100
_SYN_SEED = 20240517


def _shape_distance(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (in object radii, negative inside) to the outline of shape ``kind``."""
    if kind == "circle":
        return np.sqrt(u * u + v * v) - 0.95
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.78
    if kind == "triangle":
        # Equilateral triangle as the intersection of three half-planes; inradius 0.5, circumradius 1.
        edges = [-v, 0.866 * u + 0.5 * v, -0.866 * u + 0.5 * v]
        return np.maximum(np.maximum(edges[0], edges[1]), edges[2]) - 0.5
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.32, av - 0.95), np.maximum(au - 0.95, av - 0.32))
    return np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.26


def _texture(kind: str, u: np.ndarray, v: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Brightness pattern in [0, 1] painted on an object, in its own rotated and scaled frame."""
    if kind == "solid":
        return np.ones_like(u)
    stripes_u = np.clip(3.0 * np.sin(2 * np.pi * (u / 0.55 + phase)), -1.0, 1.0)
    if kind == "striped":
        return 0.5 + 0.5 * stripes_u
    stripes_v = np.clip(3.0 * np.sin(2 * np.pi * (v / 0.55 + phase)), -1.0, 1.0)
    return 0.5 + 0.5 * stripes_u * stripes_v


def _coverage(distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a pixel from its signed distance to an outline in pixels."""
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, shade: np.ndarray | None = None) -> None:
    """Blend per-image ``colour`` ``(N, 3)``, darkened per pixel by ``shade`` if given, into ``canvas`` by ``alpha``."""
    keep = 1.0 - alpha
    ink = alpha if shade is None else alpha * shade
    # Channel by channel and in place: whole-batch temporaries would be the slowest part of generation.
    for c in range(canvas.shape[1]):
        plane = canvas[:, c]
        plane *= keep
        plane += ink * colour[:, c, None, None]


def _object_frame(rng, n, xs, ys, radius, centre):
    """Random placement of one object per image: its pixel coordinates rotated and scaled to radius 1.

    Returns ``u, v`` of shape ``(N, H, W)`` and the radius in pixels as ``(N, 1, 1)``; ``radius`` and
    ``centre`` are the (low, high) ranges the size and both centre coordinates are drawn from.
    """
    r = rng.uniform(*radius, n).astype(np.float32)[:, None, None]
    cx, cy = rng.uniform(*centre, (2, n)).astype(np.float32)[:, :, None, None]
    turn = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    cos_t, sin_t = np.cos(turn), np.sin(turn)
    ox, oy = xs - cx, ys - cy
    return (ox * cos_t + oy * sin_t) / r, (oy * cos_t - ox * sin_t) / r, r


def _shape_field(kinds: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in radii) to each image's own shape, ``kinds`` indexing ``_SYN_SHAPES``."""
    distance = np.empty_like(u)
    for k, kind in enumerate(_SYN_SHAPES):
        sel = kinds == k
        distance[sel] = _shape_distance(kind, u[sel], v[sel])
    return distance


def _stroke(rng, n, xs, ys, blobs: bool = True) -> np.ndarray:
    """Coverage ``(N, H, W)`` of one random thin bar per image, or (half the time, if ``blobs``) a small disc."""
    start = rng.uniform(0, _SYN_SIZE, (n, 2)).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    is_blob = rng.random(n) < (0.5 if blobs else 0.0)
    length = np.where(is_blob, 0.0, rng.uniform(5, 14, n)).astype(np.float32)[:, None, None]
    width = np.where(is_blob, rng.uniform(1.5, 3.2, n), rng.uniform(0.5, 1.2, n)).astype(np.float32)[:, None, None]
    dx, dy = np.cos(direction)[:, None, None], np.sin(direction)[:, None, None]
    px, py = xs - start[:, 0, None, None], ys - start[:, 1, None, None]
    # Distance to a segment: project onto it, clamp to its ends, measure what is left.
    along = np.clip(px * dx + py * dy, 0, length)
    return _coverage(np.hypot(px - along * dx, py - along * dy) - width)


def _generate_synthetic(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one uint8 ``(N, 3, 32, 32)`` image per label: cluttered background, distractors, then the object."""
    n, size = len(labels), _SYN_SIZE
    f32 = np.float32
    grid = np.arange(size, dtype=f32) + 0.5
    ys, xs = grid[None, :, None], grid[None, None, :]

    # Background: a two-colour gradient plus smooth low-frequency blotches, independent of the class.
    low, high = rng.uniform(0.05, 0.95, (2, n, 3)).astype(f32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(f32)
    ramp = (xs * np.cos(angle)[:, None, None] + ys * np.sin(angle)[:, None, None]) / size
    ramp = (ramp - ramp.min(axis=(1, 2), keepdims=True)) / np.ptp(ramp, axis=(1, 2), keepdims=True)
    canvas = low[:, :, None, None] + (high - low)[:, :, None, None] * ramp[:, None]
    coarse = rng.normal(0.0, 0.12, (n, 3, 6, 6)).astype(f32)
    # Bilinear upsampling 6 -> 32 by explicit interpolation (BLAS threads fight badly on a busy machine).
    spread = np.linspace(0, 5, size, dtype=f32)
    below = np.minimum(spread.astype(int), 4)
    frac = spread - below
    rows = coarse[:, :, below, :] * (1 - frac)[:, None] + coarse[:, :, below + 1, :] * frac[:, None]
    canvas += rows[..., below] * (1 - frac) + rows[..., below + 1] * frac

    # Clutter behind the object: bars and blobs of any colour, and a small decoy shape in a class colour,
    # so that neither "something round" nor "something red" alone gives the class away.
    for _ in range(3):
        _paint(canvas, _stroke(rng, n, xs, ys), rng.uniform(0, 1, (n, 3)).astype(f32))
    palette = np.array(list(_SYN_COLOURS.values()), dtype=f32)
    u, v, r = _object_frame(rng, n, xs, ys, radius=(2.5, 4.0), centre=(3.0, 29.0))
    decoy_shape = rng.integers(0, len(_SYN_SHAPES), n)
    decoy_colour = palette[rng.integers(0, len(palette), n)] * rng.uniform(0.6, 1.0, (n, 1)).astype(f32)
    _paint(canvas, _coverage(_shape_field(decoy_shape, u, v) * r), decoy_colour)

    # The object: position, size and rotation vary freely; shape, colour and texture carry the class.
    u, v, r = _object_frame(rng, n, xs, ys, radius=(4.5, 10.0), centre=(7.0, 25.0))
    phase = rng.uniform(0, 1, n).astype(f32)[:, None, None]
    shape_of = np.array([_SYN_SHAPES.index(c[0]) for c in _SYN_CLASSES])[labels]
    texture_of = np.array([_SYN_TEXTURES.index(c[2]) for c in _SYN_CLASSES])[labels]
    base = np.array([_SYN_COLOURS[c[1]] for c in _SYN_CLASSES], dtype=f32)[labels]
    # Jittered hue and brightness keep colour a soft cue rather than an exact key.
    colour = np.clip(base + rng.normal(0, 0.07, (n, 3)), 0, 1) * rng.uniform(0.6, 1.0, (n, 1))
    pattern = np.empty_like(u)
    for k, kind in enumerate(_SYN_TEXTURES):
        sel = texture_of == k
        pattern[sel] = _texture(kind, u[sel], v[sel], phase[sel])
    _paint(canvas, _coverage(_shape_field(shape_of, u, v) * r), colour.astype(f32), 0.3 + 0.7 * pattern)

    # A last thin bar in front sometimes cuts across the object, as occluders do in real photos.
    _paint(canvas, _stroke(rng, n, xs, ys, blobs=False), rng.uniform(0, 1, (n, 3)).astype(f32))
    noise_level = rng.uniform(0.03, 0.08, (n, 1, 1, 1)).astype(f32)
    canvas += rng.standard_normal(canvas.shape, dtype=f32) * noise_level
    return np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _load_synthetic() -> tuple[DatasetInfo, Split, Split]:
    """Generate the toy dataset; the bytes depend only on the fixed seed, never on global RNG state."""
    rng = np.random.default_rng(_SYN_SEED)
    num_classes = len(_SYN_CLASSES)
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), _SYN_TRAIN_PER_CLASS))
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), _SYN_TEST_PER_CLASS))
    images = _generate_synthetic(np.concatenate([train_labels, test_labels]), rng)
    n_train = len(train_labels)
    train = Split(torch.from_numpy(images[:n_train].copy()), torch.from_numpy(train_labels.astype(np.int64)))
    test = Split(torch.from_numpy(images[n_train:].copy()), torch.from_numpy(test_labels.astype(np.int64)))
    mean, std = _channel_stats(train.images)
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        image_size=_SYN_SIZE,
        mean=mean,
        std=std,
        classes=tuple("-".join(c) for c in _SYN_CLASSES),
    )
    return info, train, test


# ----------------------------------------------------------------------------------------------------
# Validation hold-out


def _hold_out(train: Split, num_classes: int, val_size: int) -> tuple[Split, Split | None]:
    """Move ``val_size // num_classes`` random samples of every class from ``train`` into a validation split."""
    if val_size == 0:
        return train, None
    keep, held = _split_per_class(train, num_classes, val_size, "--val_size", _VAL_SEED)
    return _subset(train, keep), _subset(train, held)


def _train_subset(train: Split, num_classes: int, size: int) -> Split:
    """A class-balanced random subset of ``size`` training samples (``size // num_classes`` per class)."""
    if size == 0:
        return train
    _, chosen = _split_per_class(train, num_classes, size, "--train_subset", _SUBSET_SEED)
    return _subset(train, chosen.sort().values)


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


def _subset(split: Split, index: torch.Tensor) -> Split:
    """A new split holding ``split``'s samples at ``index``, in that order."""
    return Split(images=split.images[index].contiguous(), labels=split.labels[index].contiguous())


# ----------------------------------------------------------------------------------------------------
# Augmentation and normalisation


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


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, mean, std) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a uint8 batch ``(B, 3, H, W)``, then ``normalize``.

    Image ``b`` is zero-padded by ``PAD`` pixels, cropped back to ``H x W`` with its top-left corner at
    ``offsets[b] = (top, left)`` of the padded image, and mirrored left-right where ``flips[b]``; this is
    exactly torchvision's ``RandomCrop(H, padding=PAD)`` followed by ``RandomHorizontalFlip``. Works on
    any device; ``offsets`` and ``flips`` are moved to the images' device.
    """
    b, c, h, w = images.shape
    device = images.device
    offsets = offsets.to(device=device, dtype=torch.long)
    flips = flips.to(device=device, dtype=torch.bool)
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
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
):
    """One epoch: yields (x float32 normalized on `device` NCHW, y int64 on device, idx int64 on device: the sample's index in `split`).

    Every random choice of the epoch (order, crops, flips) is drawn from the CPU ``generator`` when this
    function is called, so restoring the generator's state reproduces the epoch. ``mode="device"`` augments
    whole batches on ``device`` with ``augment_batch``; ``mode="loader"`` runs torchvision's RandomCrop,
    RandomHorizontalFlip, ToTensor and Normalize per image in a ``DataLoader`` with ``num_workers``.
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
        return _device_batches(split, info, batch_size, device, order, offsets, flips)
    epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return _loader_batches(split, info, batch_size, device, order, epoch_seed, num_workers)


def _device_batches(split, info, batch_size, device, order, offsets, flips):
    """Yield augmented batches gathered from the split's device copy in ``order``."""
    images, labels = _on_device(split, device)
    order, offsets, flips = order.to(device), offsets.to(device), flips.to(device)
    for start in range(0, len(order), batch_size):
        batch = slice(start, start + batch_size)
        idx = order[batch]
        yield augment_batch(images[idx], offsets[batch], flips[batch], info.mean, info.std), labels[idx], idx


class _AugmentedImages(torch.utils.data.Dataset):
    """Per-image torchvision augmentation of a uint8 split, returning ``(x, y, idx)``.

    The transforms draw from torch's global RNG, so each sample reseeds it from the epoch seed and its
    index (restoring the previous state afterwards): results then do not depend on the number of workers
    or on anything else the caller's process does with the global RNG.
    """

    def __init__(self, split: Split, info: DatasetInfo, epoch_seed: int):
        from torchvision import transforms

        self.images = split.images
        self.labels = split.labels
        self.epoch_seed = epoch_seed
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(info.image_size, padding=PAD),
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


def _loader_batches(split, info, batch_size, device, order, epoch_seed, num_workers):
    """Yield batches from a ``DataLoader`` that visits ``order`` with torchvision's per-image augmentation."""
    loader = torch.utils.data.DataLoader(
        _AugmentedImages(split, info, epoch_seed),
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
