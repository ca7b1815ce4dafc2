"""Make an ``imagefolder`` tree (train/ and test/) from a folder of class subfolders.

Used for the real-data reproduction: the 50,000 CIFAR-10 training JPEGs in ../shared/data have no
test split, so a fixed number of images per class is held out as test and, optionally, the training
part is cut to a budget. Files are linked, not copied. The choice is a seeded shuffle per class, so the
same command always makes the same split.
"""
import argparse
import os
import random
import sys
from pathlib import Path


def main(argv=None) -> int:
    """Parse arguments and write the split; exit code 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="folder with one subfolder of images per class")
    p.add_argument("dest", help="output folder (gets train/ and test/)")
    p.add_argument("--test_per_class", type=int, default=500)
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
    for name in classes:
        files = sorted(f for f in (source / name).iterdir() if f.is_file())
        random.Random(f"{args.seed}-{name}").shuffle(files)
        need = args.test_per_class + max(args.train_per_class, 1)
        if len(files) < need:
            print(f"error: class '{name}' has {len(files)} images, fewer than the {need} asked for", file=sys.stderr)
            return 2
        test = files[:args.test_per_class]
        train = files[args.test_per_class:]
        if args.train_per_class:
            train = train[:args.train_per_class]
        for split, chosen in (("train", train), ("test", test)):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                os.symlink(f.resolve(), folder / f.name)
    print(f"wrote {dest}: {len(classes)} classes, {args.test_per_class} test and "
          f"{args.train_per_class or 'all remaining'} train images per class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
