"""The streaming path's images: a file decoded and cropped per sample, in a DataLoader worker.

Training takes torchvision's ``RandomResizedCrop(crop)`` (area 8-100%, aspect 3/4-4/3, bilinear) and a
horizontal flip; evaluation resizes the shorter side to ``round(crop * 256 / 224)`` and takes the centre
``crop x crop`` (256 then 224 at the default crop). Each is done as one Pillow resize of a box of the source
image, and a JPEG is first decoded at the largest power-of-two reduction (1/2, 1/4, 1/8; ``Image.draft``,
which libjpeg does in the DCT domain) that keeps that box at least ``crop`` pixels on each side. The
decoder was chosen by measurement against full Pillow decoding and ``torchvision.io.decode_image`` with
``transforms.v2`` (``bench/loader_bench.py``, figures in docs/IMAGENET.md): the latter is faster at 224 px
on 500x375 JPEGs, but torchvision 0.29 deprecates its image decoding for removal (superseded by TorchCodec).

Every random draw of a sample comes from torch's global generator seeded by the epoch's seed and the
sample's index (``seeded``): an epoch's images do not depend on the number of workers, and a resumed
epoch repeats them. A file that cannot be read gives a blank image and ``ok = False``; the batch
iterator (``batches``) turns that into an error naming the file.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from dihkit.sources.data_types import FileSplit

# torchvision's RandomResizedCrop defaults: the crop's share of the image area and its aspect ratio.
AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
# ImageNet's evaluation protocol: resize to 256, centre crop 224; other crops keep the ratio.
EVAL_RATIO = 256 / 224


@contextlib.contextmanager
def seeded(epoch_seed: int, index: int):
    """torch's global generator seeded from ``epoch_seed`` and sample ``index`` inside the block, restored after.

    The large odd multiplier gives neighbouring samples unrelated streams; restoring the state keeps a
    single-process loader (``num_workers`` 0) from disturbing the caller's random stream.
    """
    saved = torch.get_rng_state()
    torch.default_generator.manual_seed((epoch_seed + index * 0x9E3779B97F4A7C15) % 2**64)
    try:
        yield
    finally:
        torch.set_rng_state(saved)


def eval_resize(crop: int) -> int:
    """The shorter side evaluation resizes to before its centre crop (256 for 224)."""
    return round(crop * EVAL_RATIO)


def train_box(image: Image.Image) -> tuple[float, float, float, float]:
    """A RandomResizedCrop box ``(left, top, right, bottom)`` of ``image``, drawn from torch's global generator."""
    top, left, height, width = RandomResizedCrop.get_params(image, list(AREA), list(RATIO))
    return left, top, left + width, top + height


def eval_box(size: tuple[int, int], crop: int) -> tuple[float, float, float, float]:
    """The box of a ``size = (W, H)`` image that resizing to ``eval_resize(crop)`` then centre cropping keeps.

    Sizes and offsets are rounded as torchvision's ``Resize`` and ``CenterCrop`` round them, so resizing
    this box alone to ``crop x crop`` samples the same points as resizing the whole image and cropping.
    """
    width, height = size
    short = eval_resize(crop)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def decode_crop(path: str, crop: int, train: bool, draft: bool = True) -> np.ndarray:
    """The file's ``crop x crop`` RGB crop as uint8 ``(crop, crop, 3)``: a training crop and flip, or the evaluation
    crop. ``draft=False`` decodes a JPEG at full size (the loader benchmark's comparison)."""
    with Image.open(path) as image:
        width, height = image.size
        box = train_box(image) if train else eval_box(image.size, crop)
        scale = max(crop / (box[2] - box[0]), crop / (box[3] - box[1]))
        if draft and scale < 1:
            # A no-op for other formats than JPEG; the decoder never goes below the size asked for.
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        sx, sy = image.size[0] / width, image.size[1] / height
        picture = image.convert("RGB").resize((crop, crop), Image.BILINEAR,
                                              box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    # RandomHorizontalFlip's draw, after the crop's (the same order as the torchvision pipeline).
    if train and torch.rand(1) < 0.5:
        picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(picture)


class StreamedImages(torch.utils.data.Dataset):
    """A ``FileSplit``'s images, decoded and cropped on request: ``(uint8 (crop, crop, 3), label, index, ok)``.

    A key is ``(index, epoch_seed)`` (``batches``' samplers send the epoch's seed with each index, so
    persistent workers need no message when an epoch starts); evaluation ignores the seed.
    """

    def __init__(self, split: FileSplit, crop: int, train: bool):
        self.split, self.crop, self.train = split, crop, train

    def __len__(self) -> int:
        """Number of images in the split."""
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        """Image ``key[0]`` cropped, with its label, its index and whether its file could be read."""
        index, epoch_seed = key
        try:
            with seeded(epoch_seed, index):
                pixels, ok = decode_crop(self.split.path(index), self.crop, self.train), True
        # Pillow signals a bad file with several exception types (OSError, ValueError, SyntaxError,
        # decompression bombs); the main process names the file (batches.unreadable).
        except Exception:
            pixels, ok = np.zeros((self.crop, self.crop, 3), dtype=np.uint8), False
        return torch.from_numpy(pixels), self.split.labels[index], index, ok
