"""Decoding folders of image files into uint8 arrays, with an optional on-disk cache of the result.

Decoding 100k JPEGs takes minutes, so the decoded splits can be kept in a cache folder (by default
``default_cache_dir()``, never inside the user's data folder). Each data folder gets its own file,
named after the folder and a hash of its absolute path, and the file records a digest of every image's
name, size and modification time, so a changed folder is decoded again rather than misread. Within
``writes_held`` (the read-only mode a ``--resume`` loads its data in, until the resume's checks pass) a
missing or stale cache is decoded but not written: its write is handed to the caller.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dihkit.files.atomic_files import atomic_file
from dihkit.sources.data_types import Split
from dihkit.foundations.errors import UserError

# Bumped whenever the cache layout changes, so an old file is rebuilt rather than misread.
_CACHE_VERSION = "1"
# While ``writes_held`` runs: the cache writes put off (callables), else None (caches are written at once).
_held: list | None = None


@contextmanager
def writes_held():
    """Read-only cache mode: within the block no cache file is written; yields the list of the writes put off
    (each a callable writing one cache), for the caller to run once writing is allowed."""
    global _held
    outer, _held = _held, []
    try:
        yield _held
    finally:
        _held = outer


def default_cache_dir() -> str:
    """Where decoded images are cached unless told otherwise: ``$XDG_CACHE_HOME/dih-toolkit`` or ``~/.cache/dih-toolkit``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dih-toolkit")


def cache_file(root: Path, cache_dir: str | os.PathLike) -> Path:
    """The cache file of data folder ``root`` inside ``cache_dir``: readable folder name plus a hash of its path.

    The hash of the absolute path keeps two folders with the same name (``data/train`` and
    ``other/train``) from ever sharing, and overwriting, one cache.
    """
    absolute = os.path.abspath(root)
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(absolute)) or "root"
    return Path(cache_dir) / f"{readable}-{digest}.npz"


def decode_splits(
    root: Path,
    train_files: list[str],
    train_labels: list[int],
    test_files: list[str],
    test_labels: list[int],
    classes: tuple[str, ...],
    cache_dir: str | os.PathLike | None,
) -> tuple[Split, Split]:
    """Decode both splits' image files, reusing ``root``'s cache in ``cache_dir`` when it matches the file list.

    ``cache_dir=None`` decodes every time and writes nothing; within ``writes_held`` the write is put off.
    """
    files = train_files + test_files
    cache = None
    if cache_dir is not None:
        cache = cache_file(root, cache_dir)
        key = _cache_key(root, files, train_labels + test_labels, classes, len(train_files))
        cached = _read_cache(cache, key, len(files))
        if cached is not None:
            return cached
    images = _decode_files(files)
    n_train = len(train_files)
    train = Split(torch.from_numpy(images[:n_train]), torch.tensor(train_labels, dtype=torch.int64))
    test = Split(torch.from_numpy(images[n_train:]), torch.tensor(test_labels, dtype=torch.int64))
    if cache is not None:
        write = functools.partial(_write_cache, cache, key, len(files), train, test)
        if _held is None:
            write()
        else:
            _held.append(write)
    return train, test


def _cache_key(root: Path, files: list[str], labels: list[int], classes: tuple[str, ...], n_train: int) -> str:
    """A digest of everything the decoded arrays depend on: names, sizes, modification times and labels."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\n{n_train}\n{classes}\n".encode())
    # Relative names keep the key independent of where the folder is mounted.
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
    """Store decoded splits in ``cache`` and say so on stdout; a cache that cannot be written is reported, not fatal."""
    try:
        # Readers never see a half-written cache: the writer replaces the file only once it is whole.
        with atomic_file(cache) as out:
            np.savez(out, key=np.array(key), count=np.array(count), train_images=train.images.numpy(),
                     train_labels=train.labels.numpy(), test_images=test.images.numpy(),
                     test_labels=test.labels.numpy())
    except UserError as err:
        print(f"Could not write the decoded-image cache: {err}; continuing without it.", file=sys.stderr)
        return
    # The cache can be gigabytes in the user's home: say where it went so it can be found and removed.
    print(f"Cached the decoded images in {cache} ({cache.stat().st_size / 1e6:.1f} MB).")


def _read_image(path: str) -> np.ndarray:
    """One image file as an RGB uint8 ``(H, W, 3)`` array; ``UserError`` naming the file if it cannot be read.

    The pixels as stored: an EXIF orientation tag is not applied, as torchvision's ImageFolder does not apply it
    (docs/METHODS.md, "Your own images")."""
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
        """Decode files ``start:stop`` into ``out``; return the sizes of those that differ from the first."""
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
        _refuse_odd_size(files, shape, odd)
    if shape[0] != shape[1]:
        raise UserError(f"Images must be square, but {files[0]} and the others are {shape[1]}x{shape[0]}.")
    return out


def _refuse_odd_size(files: list[str], first_shape: tuple[int, ...], odd: dict[int, tuple[int, ...]]) -> None:
    """Raise naming a file whose size differs from the majority's (not whichever file happened to come first)."""
    sizes = Counter(odd.values())
    sizes[first_shape] = len(files) - len(odd)
    common = sizes.most_common(1)[0][0]
    culprit = next(i for i in range(len(files)) if odd.get(i, first_shape) != common)
    got = odd.get(culprit, first_shape)
    raise UserError(
        f"Image {files[culprit]} is {got[1]}x{got[0]} but most images are {common[1]}x{common[0]}; all must match."
    )
