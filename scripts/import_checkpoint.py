"""Convert a RepDistiller/mdistiller checkpoint once into this toolkit's checked model file.

    python3 scripts/import_checkpoint.py --arch resnet56 resnet56_vanilla/ckpt_epoch_240.pth runs/resnet56.pth

The input (``{'epoch', 'model', 'accuracy', 'optimizer'}`` or ``{'model': ...}``) is renamed by the rules of
``models_repo/upstream.py`` and checked tensor by tensor; the output is a model file of the toolkit (its
architecture, classes, dataset and image size, the upstream epoch and accuracy, and the digest of its
tensors), written atomically. ``--saved_path`` reads either file; the converted one loads without renaming.
A refused input is one sentence on stderr and exit code 2.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataload  # noqa: E402
from dihkit.files.checkpoints import atomic_save, load_model_file, model_record, safe_load  # noqa: E402
from dihkit.foundations.errors import UserError, exit_code  # noqa: E402
from models_repo import BENCHMARK, MODELS, build_model  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    """The script's arguments."""
    p = argparse.ArgumentParser(description="Convert a RepDistiller/mdistiller checkpoint to this toolkit's format.")
    p.add_argument("--arch", required=True, choices=list(MODELS), metavar="NAME",
                   help=f"the checkpoint's architecture (the benchmark's: {', '.join(BENCHMARK)})")
    p.add_argument("--dataset", default="cifar100", choices=["cifar10", "cifar100", "tiny-imagenet"],
                   help="the dataset it was trained on, recorded in the output (default: cifar100)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("input", help="the RepDistiller/mdistiller file")
    p.add_argument("output", help="the toolkit model file to write")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    """Read, rename, check and write; returns the line that reports it."""
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"'{args.output}' exists; pass --overwrite to replace it")
    info = dataload.known_info(args.dataset)
    model = build_model(args.arch, info.num_classes)
    meta = load_model_file(args.input, model, args.arch, info.num_classes, "checkpoint", args.dataset)
    if meta.get("source") is None:
        raise UserError(f"checkpoint '{args.input}' is not a RepDistiller/mdistiller file; it needs no conversion")
    upstream = safe_load(args.input, "checkpoint")
    accuracy = upstream.get("accuracy")
    record = model_record(model, args.arch, info.num_classes, args.dataset, info.image_size,
                          source=meta["source"], imported_from=os.path.basename(args.input),
                          upstream_epoch=meta.get("upstream_epoch"),
                          upstream_accuracy=None if accuracy is None else float(accuracy))
    atomic_save(record, args.output)
    return f"wrote {args.output}: {args.arch}, {len(record['state_dict'])} tensors, {info.num_classes} classes"


def main(argv=None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    args = parse(argv)
    return exit_code(lambda: print(convert(args)))


if __name__ == "__main__":
    sys.exit(main())
