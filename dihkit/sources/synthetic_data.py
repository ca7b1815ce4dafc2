"""The generated ``synthetic`` dataset: 10 classes of 32x32 pictures that need a real classifier.

Each class is a combination of shape, colour and texture drawn on a cluttered background with decoys,
so that no single cue (mean colour, roundness) gives the class away. The images are generated from a
fixed seed in memory, so the dataset needs no files and is byte-identical on every run; it exists for
tests and for trying the toolkit without a download.
"""

from __future__ import annotations

import numpy as np
import torch

from dihkit.sources.data_types import DatasetInfo, Split, channel_stats

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
# The per-channel statistics of the generated training images (what ``load_synthetic`` computes), kept
# here so ``synthetic_info`` can answer without generating 6,000 images; a test checks they still agree.
_SYN_MEAN = (0.47208901654411767, 0.46316568627450977, 0.46845440410539213)
_SYN_STD = (0.23868157979759677, 0.23679058052197324, 0.24125451095447809)


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



def _background(rng: np.random.Generator, n: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Float canvases ``(N, 3, H, W)``: a two-colour gradient plus smooth low-frequency blotches, independent of the class."""
    size, f32 = _SYN_SIZE, np.float32
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
    return canvas


def _clutter(rng: np.random.Generator, canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
    """Paint bars and blobs of any colour, and a small decoy shape in a class colour, behind the object.

    With them neither "something round" nor "something red" alone gives the class away.
    """
    n, f32 = len(canvas), np.float32
    for _ in range(3):
        _paint(canvas, _stroke(rng, n, xs, ys), rng.uniform(0, 1, (n, 3)).astype(f32))
    palette = np.array(list(_SYN_COLOURS.values()), dtype=f32)
    u, v, r = _object_frame(rng, n, xs, ys, radius=(2.5, 4.0), centre=(3.0, 29.0))
    decoy_shape = rng.integers(0, len(_SYN_SHAPES), n)
    decoy_colour = palette[rng.integers(0, len(palette), n)] * rng.uniform(0.6, 1.0, (n, 1)).astype(f32)
    _paint(canvas, _coverage(_shape_field(decoy_shape, u, v) * r), decoy_colour)


def _draw_object(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray, xs, ys) -> None:
    """Paint each image's object: position, size and rotation vary freely; shape, colour and texture carry the class."""
    n, f32 = len(labels), np.float32
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


def _generate_synthetic(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one uint8 ``(N, 3, 32, 32)`` image per label: cluttered background, distractors, then the object.

    The steps draw from ``rng`` in a fixed order; reordering them would change every image.
    """
    n, f32 = len(labels), np.float32
    grid = np.arange(_SYN_SIZE, dtype=f32) + 0.5
    ys, xs = grid[None, :, None], grid[None, None, :]
    canvas = _background(rng, n, xs, ys)
    _clutter(rng, canvas, xs, ys)
    _draw_object(rng, canvas, labels, xs, ys)
    # A last thin bar in front sometimes cuts across the object, as occluders do in real photos.
    _paint(canvas, _stroke(rng, n, xs, ys, blobs=False), rng.uniform(0, 1, (n, 3)).astype(f32))
    noise_level = rng.uniform(0.03, 0.08, (n, 1, 1, 1)).astype(f32)
    canvas += rng.standard_normal(canvas.shape, dtype=f32) * noise_level
    return np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)


def synthetic_info(mean=_SYN_MEAN, std=_SYN_STD) -> DatasetInfo:
    """The ``DatasetInfo`` of the generated dataset; by default with its known statistics, without generating it."""
    return DatasetInfo(
        name="synthetic",
        num_classes=len(_SYN_CLASSES),
        image_size=_SYN_SIZE,
        mean=tuple(mean),
        std=tuple(std),
        classes=tuple("-".join(c) for c in _SYN_CLASSES),
    )


def load_synthetic() -> tuple[DatasetInfo, Split, Split]:
    """Generate the toy dataset; the bytes depend only on the fixed seed, never on global RNG state."""
    rng = np.random.default_rng(_SYN_SEED)
    num_classes = len(_SYN_CLASSES)
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), _SYN_TRAIN_PER_CLASS))
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), _SYN_TEST_PER_CLASS))
    images = _generate_synthetic(np.concatenate([train_labels, test_labels]), rng)
    n_train = len(train_labels)
    train = Split(torch.from_numpy(images[:n_train].copy()), torch.from_numpy(train_labels.astype(np.int64)))
    test = Split(torch.from_numpy(images[n_train:].copy()), torch.from_numpy(test_labels.astype(np.int64)))
    # Computed rather than taken from _SYN_MEAN/_SYN_STD: the images themselves are the truth.
    mean, std = channel_stats(train.images)
    return synthetic_info(mean, std), train, test
