"""The datasets read from disk: CIFAR-10/100, Tiny-ImageNet and a tree of image folders.

Each ``load_*`` function returns ``(DatasetInfo, train Split, test Split)`` of uint8 ``(N, 3, H, W)``
images; ``dataload.load_data`` chooses among them. The ``*_info`` functions give the fixed facts of the
published datasets, so ``dataload.known_info`` can answer without reading a file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from dihkit.sources.data_types import DatasetInfo, ImageTree, Split, channel_stats
from dihkit.sources.decode_cache import decode_splits
from dihkit.foundations.errors import UserError

CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        # The label names of the archive's batches.meta, in label order.
        "classes": "airplane automobile bird cat deer dog frog horse ship truck",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        # The fine label names of the archive's meta file, in label order (which is alphabetical).
        "classes": "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus"
        " butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab"
        " crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard"
        " lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom"
        " oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine"
        " possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake"
        " spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor"
        " train trout tulip turtle wardrobe whale willow_tree wolf woman worm",
    },
}

TINY_FOLDER = "tiny-imagenet-200"
TINY_CLASSES = 200
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_TINY_MEAN = (0.4802, 0.4481, 0.3975)
_TINY_STD = (0.2770, 0.2691, 0.2821)

_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_SPLIT_HELPER = "python3 scripts/split_imagefolder.py"


# ----------------------------------------------------------------------------------------------------
# CIFAR-10/100


def cifar_info(name: str, classes: tuple[str, ...] | None = None) -> DatasetInfo:
    """The ``DatasetInfo`` of ``cifar10`` or ``cifar100``; ``classes`` defaults to the published label names."""
    spec = CIFAR[name]
    classes = tuple(spec["classes"].split()) if classes is None else classes
    return DatasetInfo(name=name, num_classes=len(classes), image_size=32, mean=spec["mean"], std=spec["std"],
                       classes=classes)


def load_cifar(name: str, data_dir: str, download: bool) -> tuple[DatasetInfo, Split, Split]:
    """Read CIFAR-10/100 through torchvision's own dataset classes, downloading only when allowed."""
    from torchvision.datasets import CIFAR10, CIFAR100

    spec = CIFAR[name]
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
            with _tidy_failed_download(data_dir, os.path.basename(spec["url"])):
                train = cls(root=data_dir, train=True, download=True)
        # The network, the archive checksum or the extraction can each fail in its own way;
        # all mean the same to the user.
        except Exception as failed:
            raise UserError(where.format(why="could not be downloaded")) from failed
    try:
        test = cls(root=data_dir, train=False, download=False)
    except (RuntimeError, OSError) as missing:
        raise UserError(where.format(why="its test batch is missing or corrupted")) from missing
    info = cifar_info(name, tuple(str(c) for c in train.classes))
    return info, _split_from_hwc(train.data, train.targets), _split_from_hwc(test.data, test.targets)


def _split_from_hwc(images: np.ndarray, labels) -> Split:
    """Wrap channel-last uint8 images and labels as a channel-first ``Split``."""
    chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return Split(images=chw, labels=torch.as_tensor(np.asarray(labels), dtype=torch.int64))


@contextlib.contextmanager
def _tidy_failed_download(data_dir: str, archive: str):
    """On failure inside, remove what a download left behind in folders it created: the archive, then empty folders.

    Loading a missing dataset offline must not leave an empty ``data_dir`` behind. Folders that existed
    before are left alone (their contents are the user's), and a created folder that is still not empty
    (a partial extraction, or another process's files) is kept rather than deleted.
    """
    created = []
    folder = Path(data_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                (created[0] / archive).unlink(missing_ok=True)
            for made in created:
                with contextlib.suppress(OSError):
                    made.rmdir()
        raise


# ----------------------------------------------------------------------------------------------------
# Tiny-ImageNet


def tiny_imagenet_info(wnids: tuple[str, ...] = ()) -> DatasetInfo:
    """The ``DatasetInfo`` of Tiny-ImageNet with classes ``wnids``.

    Without ``wnids`` the class names are left empty (they come from the dataset's wnids.txt, which the
    toolkit does not carry) and ``num_classes`` is the published 200.
    """
    return DatasetInfo(name="tiny-imagenet", num_classes=len(wnids) or TINY_CLASSES, image_size=64,
                       mean=_TINY_MEAN, std=_TINY_STD, classes=tuple(wnids))


def load_tiny_imagenet(data_dir: str, download: bool, cache_dir) -> tuple[DatasetInfo, Split, Split]:
    """Read Tiny-ImageNet's train folders and its labelled val set (used as the test split)."""
    root = Path(data_dir) / TINY_FOLDER
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
    if len(wnids) == 1:
        raise UserError(f"{wnids_file} lists only one class ({wnids[0]}), and a classifier needs at least two.")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    train_files, train_labels = _tiny_train_files(root, wnids)
    test_files, test_labels = _tiny_val_files(root, annotations, label_of)
    train, test = decode_splits(root, train_files, train_labels, test_files, test_labels, tuple(wnids), cache_dir)
    if train.images.shape[-1] != 64:
        raise UserError(f"Tiny-ImageNet images in {root} must be 64x64, found {train.images.shape[-1]}px.")
    return tiny_imagenet_info(tuple(wnids)), train, test


def _tiny_train_files(root: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    """Training image paths (class by class, sorted by name) and their labels."""
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        found = _image_files(folder) if folder.is_dir() else []
        if not found:
            raise UserError(f"Tiny-ImageNet class {wnid} has no training images in {folder}.")
        files += found
        labels += [label] * len(found)
    return files, labels


def _tiny_val_files(root: Path, annotations: Path, label_of: dict[str, int]) -> tuple[list[str], list[int]]:
    """The labelled validation images named in val_annotations.txt, sorted by path so the order is stable."""
    files: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserError(f"{annotations} line {number} does not name a file and a known wnid.")
        files.append(os.path.join(root, "val", "images", fields[0]))
        labels.append(label_of[fields[1]])
    if not files:
        raise UserError(f"{annotations} lists no validation images.")
    order = sorted(range(len(files)), key=files.__getitem__)
    return [files[i] for i in order], [labels[i] for i in order]


def _fetch_tiny_imagenet(data_dir: str, download: bool) -> None:
    """Download and unpack the official Tiny-ImageNet archive into ``data_dir`` or explain what to do."""
    advice = f"place the extracted '{TINY_FOLDER}' folder from {_TINY_URL} there."
    if not download:
        raise UserError(f"Tiny-ImageNet is not in {data_dir} and downloading is turned off; {advice}")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        with _tidy_failed_download(data_dir, os.path.basename(_TINY_URL)):
            download_and_extract_archive(_TINY_URL, download_root=data_dir, md5=_TINY_MD5)
    # As for CIFAR: whichever step failed, the remedy for the user is the same.
    except Exception as failed:
        raise UserError(f"Tiny-ImageNet is not in {data_dir} and could not be downloaded; {advice}") from failed
    if not (Path(data_dir) / TINY_FOLDER).is_dir():
        raise UserError(f"The Tiny-ImageNet archive did not contain a '{TINY_FOLDER}' folder; {advice}")


# ----------------------------------------------------------------------------------------------------
# Image folders


def list_image_tree(data_dir: str, test_name: str = "test") -> ImageTree:
    """List ``data_dir/{train,<test_name>}/<class>/<image>``: classes in sorted folder order, files by name."""
    root = Path(data_dir)
    if root.is_file():
        raise UserError(f"--data_dir '{root}' is a file, not a folder: an image-folder dataset is a folder holding "
                        f"train/ and {test_name}/, with one subfolder of images per class in each.")
    train_root, test_root = root / "train", root / test_name
    classes = _imagefolder_classes(root, train_root, test_root)
    train_files, train_labels = _gather(train_root, classes, require_each=True)
    test_files, test_labels = _gather(test_root, classes, require_each=False)
    if not test_files:
        raise UserError(f"{test_root} contains no images.")
    return ImageTree(str(root), classes, train_files, train_labels, test_files, test_labels)


def load_imagefolder(tree: ImageTree, cache_dir) -> tuple[DatasetInfo, Split, Split]:
    """Decode a listed ``data_dir/{train,test}`` tree into memory; size and normalisation come from the images."""
    train, test = decode_splits(Path(tree.root), tree.train_files, tree.train_labels, tree.test_files,
                                tree.test_labels, tree.classes, cache_dir)
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(tree.classes),
        image_size=int(train.images.shape[-1]),
        mean=mean,
        std=std,
        classes=tree.classes,
    )
    return info, train, test


def _imagefolder_classes(root: Path, train_root: Path, test_root: Path) -> tuple[str, ...]:
    """The class folder names shared by ``train/`` and ``test/``, refusing a tree that cannot be trained on."""
    for folder in (train_root, test_root):
        if not folder.is_dir():
            raise UserError(_missing_split_message(root, folder))
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train_root} contains no class subfolders.")
    if len(classes) == 1:
        raise UserError(
            f"{train_root} has only one class folder ({classes[0]}), and a classifier needs at least two."
        )
    test_classes = sorted(p.name for p in test_root.iterdir() if p.is_dir())
    if test_classes != classes:
        raise UserError(
            f"{test_root} must have the same class folders as {train_root}"
            f" ({len(classes)} there, {len(test_classes)} here, or different names)."
        )
    return tuple(classes)


def _missing_split_message(root: Path, folder: Path) -> str:
    """Why an image-folder tree lacking ``train/`` or ``test/`` is refused, and how the split helper makes both."""
    # The helper refuses a destination that already holds train/ or test/, so it must write a new folder.
    # A folder without train/ most likely holds the class folders themselves: name it in the command.
    if root.is_dir() and not (root / "train").is_dir():
        source, made = str(root), f"{root}-split"
    else:
        source, made = "CLASS_FOLDERS", "NEW_FOLDER"
    return (
        f"Image folder dataset needs {folder} with one subfolder per class; to make train/ and test/ from a"
        f" folder of class subfolders, run `{_SPLIT_HELPER} {source} {made}` (it sizes the test split from the"
        f" folder and prints the command to train) and pass {made} as --data_dir."
    )


def _gather(split_root: Path, classes: tuple[str, ...], require_each: bool) -> tuple[list[str], list[int]]:
    """Image paths of every class folder under ``split_root`` and their labels, class by class."""
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = _image_files(split_root / cls)
        if require_each and not found:
            raise UserError(f"Class folder {split_root / cls} contains no images.")
        files += found
        labels += [label] * len(found)
    return files, labels


def _image_files(folder: Path) -> list[str]:
    """Paths of the image files directly inside ``folder``, by name, skipping anything without an image extension.

    Plain strings rather than ``Path`` objects: with 100k files, pathlib's overhead costs seconds.
    """
    with os.scandir(folder) as entries:
        return sorted(
            e.path for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTENSIONS
        )
