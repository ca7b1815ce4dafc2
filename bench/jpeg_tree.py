"""Generated ILSVRC-2012-layout folders of JPEGs (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``).

For the loader benchmark (ImageNet-sized photos: 500x375, about 70 KB at quality 88) and the tests (small
images of mixed sizes). Each image is a smooth random field with mid-scale blotches and grain, tinted by
its class, so that its JPEG size and decoding cost vary like a photograph's and a network can learn the
classes from colour.

    python3 bench/jpeg_tree.py /tmp/imagenet_like --classes 10 --train_per_class 100 --val_per_class 20
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dihkit.files.atomic_files import atomic_file  # noqa: E402

# A photograph's share of fine grain, in grey levels: JPEG sizes of 60-90 KB at 500x375 and quality 88.
GRAIN = (5.0, 14.0)


def wnid(label: int) -> str:
    """An ImageNet-style class folder name (``n00000003``)."""
    return f"n{label:08d}"


def picture(width: int, height: int, tint: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One photograph-like RGB image: a smooth field, blotches a few pixels across, grain, and the class tint."""
    def upsampled(rows: int, cols: int, resample) -> np.ndarray:
        small = rng.integers(0, 256, (max(rows, 1), max(cols, 1), 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((width, height), resample), dtype=np.float32)

    field = 0.55 * upsampled(6, 8, Image.BICUBIC) + 0.35 * upsampled(height // 8, width // 8, Image.BILINEAR)
    grain = rng.normal(0.0, rng.uniform(*GRAIN), (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(field + grain + tint, 0, 255).astype(np.uint8))


def write_tree(root: Path, classes: int = 10, train_per_class: int = 24, val_per_class: int = 6,
               sizes=((500, 375),), quality: int = 88, odd: bool = False, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<wnid>/<wnid>_<n>.JPEG``, cycling through ``sizes`` (width, height).

    With ``odd``, class 0's first three training files are what real ImageNet also holds: a greyscale JPEG,
    a CMYK JPEG and a PNG under a ``.JPEG`` name.
    """
    rng = np.random.default_rng(seed)
    tints = rng.uniform(-60, 60, (classes, 3)).astype(np.float32)
    n = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / wnid(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = sizes[n % len(sizes)]
                n += 1
                image = picture(width, height, tints[label], rng)
                path = folder / f"{wnid(label)}_{i}.JPEG"
                kind = i if odd and split == "train" and label == 0 else None
                # The odd ones: a greyscale JPEG, a CMYK JPEG, a PNG under a .JPEG name.
                mode, form = {0: ("L", "JPEG"), 1: ("CMYK", "JPEG"), 2: ("RGB", "PNG")}.get(kind, ("RGB", "JPEG"))
                with atomic_file(path) as out:
                    image.convert(mode).save(out, form, **({"quality": quality} if form == "JPEG" else {}))
    return root


def main(argv=None) -> int:
    """Write a tree from the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train_per_class", type=int, default=100)
    p.add_argument("--val_per_class", type=int, default=20)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    args = p.parse_args(argv)
    write_tree(args.root, args.classes, args.train_per_class, args.val_per_class, ((args.width, args.height),))
    print(f"wrote {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
