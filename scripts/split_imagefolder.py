"""Make an ``imagefolder`` tree (train/ and test/) from a folder of class subfolders, and print the command
that trains on it.

    python3 scripts/split_imagefolder.py CLASS_FOLDERS NEW_FOLDER [--test_per_class N] [--train_per_class N]

By default a fifth of the smallest class (at most 500 images) is held out per class as test and the rest
trains, so a small folder (3 classes of 30 images) splits as well as CIFAR-10's 5,000 per class. Files are
linked, not copied. The choice is a seeded shuffle per class, so the same command always makes the same split.
"""
import argparse
import os
import random
import shlex
import sys
from pathlib import Path

# Without --test_per_class: a fifth of the smallest class, at most 500 (CIFAR-10's test share per class).
TEST_SHARE, TEST_CAP = 5, 500


def default_test_per_class(smallest: int) -> int:
    """Test images per class for a folder whose smallest class has ``smallest`` images."""
    return min(TEST_CAP, max(1, smallest // TEST_SHARE))


def train_command(dest: Path) -> str:
    """One epoch of a small model on the new split, every training image, the console's defaults otherwise."""
    return (f"python3 final_test.py --dataset imagefolder --data_dir {shlex.quote(str(dest))} --training_type ce "
            "--teacher res8 --epochs 1 --seed 30 --path_to_save runs/first.pth")


def write_split(files: dict, dest: Path, test_per_class: int, train_per_class: int, seed: int) -> None:
    """Link each class's files into ``dest/test`` and ``dest/train`` after a seeded shuffle per class."""
    for name, chosen in files.items():
        chosen = sorted(chosen)
        random.Random(f"{seed}-{name}").shuffle(chosen)
        test, train = chosen[:test_per_class], chosen[test_per_class:]
        if train_per_class:
            train = train[:train_per_class]
        for split, part in (("train", train), ("test", test)):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in part:
                os.symlink(f.resolve(), folder / f.name)


def main(argv=None) -> int:
    """Parse arguments, write the split and print the command to train on it; exit code 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="folder with one subfolder of images per class")
    p.add_argument("dest", help="output folder (gets train/ and test/)")
    p.add_argument("--test_per_class", type=int, default=None,
                   help=f"test images per class (default: a fifth of the smallest class, at most {TEST_CAP})")
    p.add_argument("--train_per_class", type=int, default=0, help="0: all remaining images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    source, dest = Path(args.source), Path(args.dest)
    classes = sorted(d.name for d in source.iterdir() if d.is_dir()) if source.is_dir() else []
    if not classes:
        print(f"error: '{source}' has no class subfolders", file=sys.stderr)
        return 2
    if (dest / "train").exists() or (dest / "test").exists():
        print(f"error: '{dest}' already holds a split; remove it first", file=sys.stderr)
        return 2
    if args.test_per_class is not None and args.test_per_class < 1:
        print("error: --test_per_class must be at least 1: the console needs a test image of every class",
              file=sys.stderr)
        return 2
    files = {name: [f for f in (source / name).iterdir() if f.is_file()] for name in classes}
    smallest = min(files, key=lambda name: len(files[name]))
    test = default_test_per_class(len(files[smallest])) if args.test_per_class is None else args.test_per_class
    need = test + max(args.train_per_class, 1)
    if len(files[smallest]) < need:
        print(f"error: class '{smallest}' has {len(files[smallest])} images, fewer than the {need} asked for "
              f"(at least one test and one training image per class)", file=sys.stderr)
        return 2
    write_split(files, dest, test, args.train_per_class, args.seed)
    print(f"wrote {dest}: {len(classes)} classes, {test} test and "
          f"{args.train_per_class or 'all remaining'} train images per class; train on it with\n"
          f"    {train_command(dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
