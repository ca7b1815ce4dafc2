"""The console's architectures: the teacher read from its file when not typed, then the names that mean a
CIFAR or an ImageNet network resolved by the dataset's image size (``models_repo/names.py``), in one line."""
from pathlib import Path

from PIL import Image

import dataload
from dihkit.console.console_flags import resolve_teacher
from dihkit.foundations.flags import given
from dihkit.runs.distributed import from_env
from dihkit.sources.image_trees import DEFAULT_CROP
from models_repo.names import resolution_line, resolve_name

# The flags that name a registry model.
MODEL_FLAGS = ("teacher", "student", "ta")


def folder_image_size(data_dir) -> int | None:
    """The smaller side of the first image of an image folder's first class in ``train/`` (PIL reads the header
    only); None when there is none to read (loading the folder then says what is wrong)."""
    try:
        first_class = min(p for p in (Path(data_dir) / "train").iterdir() if p.is_dir())
        for path in sorted(first_class.iterdir()):
            try:
                with Image.open(path) as image:
                    return min(image.size)
            except (OSError, ValueError):  # not an image: try the next file
                continue
    except (OSError, ValueError):  # no train/ folder, or no class folder in it
        return None
    return None


def dataset_image_size(dataset: str, data_dir, crop_size: int | None = None) -> int | None:
    """The image size the command's dataset will have, known before it is loaded (None: unknown): a built-in
    dataset's, else the streamed crop (``--crop_size``; ImageNet's default 224), else an image folder's."""
    known = dataload.known_info(dataset)
    if known is not None:
        return known.image_size
    if crop_size is not None or dataset == "imagenet":
        return crop_size or DEFAULT_CROP
    return folder_image_size(data_dir) if dataset == "imagefolder" else None


def resolve_models(args) -> None:
    """Settle ``--teacher`` (``resolve_teacher``), then resolve the model names by the dataset's image size in
    place; one line says which names changed (rank 0 only under torchrun). A teacher not typed keeps the
    architecture its file records (or the default)."""
    teacher_typed = given(args, "teacher")
    resolve_teacher(args)
    size = dataset_image_size(args.dataset, args.data_dir, args.crop_size)
    changed = []
    for dest in MODEL_FLAGS:
        if not hasattr(args, dest) or (dest == "teacher" and not teacher_typed):
            continue
        arch = resolve_name(getattr(args, dest), size)
        if arch != getattr(args, dest):
            changed.append((f"--{dest}", getattr(args, dest), arch))
            setattr(args, dest, arch)
    if changed and from_env().is_main:
        print(resolution_line(changed, size), flush=True)
