"""Tests for dataload and the modules behind it: every source read from files in its real on-disk format, and the batch iterators."""

from __future__ import annotations

import gc
import pickle
import random
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.utils
import torchvision.transforms.functional as TF
from PIL import Image

from dihkit.sources import batches
import dataload
from dihkit.files import atomic_files
from dihkit.sources import decode_cache
from dataload import (
    DATASET_NAMES,
    DatasetInfo,
    Split,
    augment_batch,
    draw_augment_params,
    eval_batches,
    load_data,
    normalize,
    train_batches,
)
from dihkit.foundations.errors import UserError

CPU = torch.device("cpu")
MEAN = (0.45, 0.5, 0.55)
STD = (0.2, 0.25, 0.3)


def make_split(n: int, size: int = 32, seed: int = 0, num_classes: int = 5) -> Split:
    """Random images with labels cycling through the classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return Split(images=images, labels=torch.arange(n) % num_classes)


def make_info(size: int = 32, num_classes: int = 5) -> DatasetInfo:
    """Info matching ``make_split``."""
    return DatasetInfo("test", num_classes, size, MEAN, STD, tuple(str(i) for i in range(num_classes)))


def write_image(path: Path, rgb, size: int = 32, fmt: str = "PNG") -> None:
    """Save a solid-colour square image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), tuple(rgb)).save(path, format=fmt)


def reference_augment(image: torch.Tensor, top: int, left: int, flip: bool, mean, std) -> torch.Tensor:
    """torchvision's RandomCrop(padding=4) + flip + ToTensor + Normalize for fixed parameters, on a PIL image."""
    h, w = image.shape[1:]
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    picture = TF.crop(TF.pad(picture, 4, fill=0), top, left, h, w)
    if flip:
        picture = TF.hflip(picture)
    return TF.normalize(TF.to_tensor(picture), mean, std)


def epoch(split, info, generator, **kwargs):
    """All batches of one training epoch, concatenated."""
    xs, ys, idxs = zip(*train_batches(split, info, device=CPU, generator=generator, **kwargs))
    return torch.cat(xs), torch.cat(ys), torch.cat(idxs), [len(i) for i in idxs]


# ----------------------------------------------------------------------------------------------------
# CIFAR, in the pickled Python 2 format the official archives use


class Py2Pickler(pickle._Pickler):
    """Writes text and bytes as Python 2 byte strings, like the pickles inside the CIFAR archives."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def dump_py2(path: Path, obj) -> None:
    """Pickle ``obj`` to ``path`` the way CIFAR's Python 2 pickles were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        Py2Pickler(out, protocol=2).dump(obj)


def random_cifar(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """CIFAR rows: ``(n, 3072)`` uint8 in channel-major order, and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, num_classes, n).tolist()


@pytest.fixture
def no_md5(monkeypatch):
    """Skip only the checksum comparison of torchvision's CIFAR classes; files must still exist."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


@pytest.fixture
def no_network(monkeypatch):
    """Make every download attempt fail as it would offline."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)


def test_cifar10_round_trip(tmp_path, no_md5, no_network):
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = [], []
    for i in range(1, 6):
        data, lab = random_cifar(3, 10, seed=i)
        dump_py2(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": lab, "data": data})
        rows.append(data)
        labels += lab
    test_data, test_labels = random_cifar(4, 10, seed=9)
    dump_py2(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump_py2(folder / "batches.meta", {"num_cases_per_batch": 3, "label_names": names, "num_vis": 3072})

    bundle = load_data("cifar10", str(tmp_path), download=False)
    assert bundle.info.classes == tuple(names)
    # What --summary uses without the files must agree with what the files say.
    assert dataload.known_info("cifar10") == bundle.info
    assert bundle.info.num_classes == 10 and bundle.info.image_size == 32
    assert bundle.info.mean == (0.4914, 0.4822, 0.4465) and bundle.info.std == (0.2470, 0.2435, 0.2616)
    assert bundle.train.images.shape == (15, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.images.is_contiguous() and bundle.val is None
    assert torch.equal(bundle.train.images.reshape(15, -1), torch.from_numpy(np.concatenate(rows)))
    assert bundle.train.labels.tolist() == labels and bundle.train.labels.dtype == torch.int64
    assert torch.equal(bundle.test.images.reshape(4, -1), torch.from_numpy(test_data))
    assert bundle.test.labels.tolist() == test_labels


def test_cifar100_round_trip(tmp_path, no_md5, no_network):
    folder = tmp_path / "cifar-100-python"
    train_data, train_labels = random_cifar(7, 100, seed=1)
    test_data, test_labels = random_cifar(5, 100, seed=2)
    for name, data, labels in (("train", train_data, train_labels), ("test", test_data, test_labels)):
        dump_py2(
            folder / name,
            {
                "filenames": [f"img_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [label // 5 for label in labels],
                "data": data,
            },
        )
    fine = [f"fine_{i}" for i in range(100)]
    dump_py2(folder / "meta", {"fine_label_names": fine, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})

    bundle = load_data("cifar100", str(tmp_path), download=True)
    assert bundle.info.classes == tuple(fine) and bundle.info.num_classes == 100
    assert bundle.info.mean == (0.5071, 0.4865, 0.4409) and bundle.info.std == (0.2673, 0.2564, 0.2762)
    assert bundle.train.images.shape == (7, 3, 32, 32) and bundle.test.images.shape == (5, 3, 32, 32)
    assert torch.equal(bundle.train.images.reshape(7, -1), torch.from_numpy(train_data))
    assert torch.equal(bundle.test.images.reshape(5, -1), torch.from_numpy(test_data))
    assert bundle.train.labels.tolist() == train_labels and bundle.test.labels.tolist() == test_labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_without_download(tmp_path, no_md5, monkeypatch, name):
    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted although download=False")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", must_not_download)
    with pytest.raises(UserError, match="not in .*downloading is turned off"):
        load_data(name, str(tmp_path), download=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_offline(tmp_path, no_md5, no_network, name):
    with pytest.raises(UserError, match="could not be downloaded") as caught:
        load_data(name, str(tmp_path), download=True)
    assert str(tmp_path) in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# Tiny-ImageNet

TINY_COLOURS = {"n01443537": (220, 30, 30), "n01629819": (30, 200, 40), "n01641577": (40, 60, 230)}


def build_tiny(root: Path, per_class: int = 3, val_per_class: int = 2) -> None:
    """A miniature tiny-imagenet-200 tree whose pixel colours encode the class."""
    tiny = root / "tiny-imagenet-200"
    wnids = list(TINY_COLOURS)
    random.Random(1).shuffle(wnids)
    tiny.mkdir(parents=True)
    (tiny / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid, colour in TINY_COLOURS.items():
        for i in range(per_class):
            write_image(tiny / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour, 64, "JPEG")
        (tiny / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for k, (wnid, colour) in enumerate(TINY_COLOURS.items()):
        for i in range(val_per_class):
            name = f"val_{k * val_per_class + i}.JPEG"
            # PNG bytes under a .JPEG name, as some re-packed copies have; the loader must sniff the format.
            write_image(tiny / "val" / "images" / name, colour, 64, "PNG")
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    random.Random(2).shuffle(lines)
    (tiny / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def nearest_class(images: torch.Tensor, colours: list[tuple[int, int, int]]) -> torch.Tensor:
    """Index of the reference colour closest to each image's mean colour."""
    mean = images.float().mean((2, 3))
    return torch.cdist(mean, torch.tensor(colours, dtype=torch.float32)).argmin(1)


def test_tiny_imagenet_labels_and_cache(tmp_path, monkeypatch):
    build_tiny(tmp_path / "data")
    data, cache_dir = str(tmp_path / "data"), tmp_path / "cache"
    bundle = load_data("tiny-imagenet", data, download=False, cache_dir=cache_dir)
    wnids = sorted(TINY_COLOURS)
    colours = [TINY_COLOURS[w] for w in wnids]
    assert bundle.info.classes == tuple(wnids) and bundle.info.image_size == 64
    assert bundle.info.mean == (0.4802, 0.4481, 0.3975) and bundle.info.std == (0.2770, 0.2691, 0.2821)
    # Without files the wnids are unknown; everything else must agree with the loaded info.
    known = dataload.known_info("tiny-imagenet")
    assert (known.name, known.image_size, known.mean, known.std) == ("tiny-imagenet", 64, bundle.info.mean, bundle.info.std)
    assert bundle.train.images.shape == (9, 3, 64, 64) and bundle.test.images.shape == (6, 3, 64, 64)
    assert torch.equal(nearest_class(bundle.train.images, colours), bundle.train.labels)
    assert torch.equal(nearest_class(bundle.test.images, colours), bundle.test.labels)
    assert torch.bincount(bundle.test.labels).tolist() == [2, 2, 2]

    # A second load must come from the cache and not decode a single file.
    (cache,) = cache_dir.iterdir()
    assert cache.name.startswith("tiny-imagenet-200-") and cache.suffix == ".npz"

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(decode_cache, "_read_image", no_decoding)
        again = load_data("tiny-imagenet", data, download=False, cache_dir=cache_dir)
    assert torch.equal(again.train.images, bundle.train.images) and torch.equal(again.test.labels, bundle.test.labels)

    # One more training image changes the file count, so the cache must be rebuilt.
    wnid = wnids[0]
    extra = tmp_path / "data" / "tiny-imagenet-200" / "train" / wnid / "images" / f"{wnid}_extra.JPEG"
    write_image(extra, colours[0], 64, "JPEG")
    grown = load_data("tiny-imagenet", data, download=False, cache_dir=cache_dir)
    assert len(grown.train) == 10 and torch.bincount(grown.train.labels).tolist() == [4, 3, 3]


def test_tiny_imagenet_read_only_cache_folder_skips_cache(tmp_path, monkeypatch, capsys):
    build_tiny(tmp_path / "data", per_class=1, val_per_class=1)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(atomic_files.tempfile, "mkstemp", read_only)
    bundle = load_data("tiny-imagenet", str(tmp_path / "data"), download=False, cache_dir=tmp_path / "cache")
    assert len(bundle.train) == 3 and not any((tmp_path / "cache").iterdir())
    assert "continuing without it" in capsys.readouterr().err


def test_tiny_imagenet_missing(tmp_path, no_network):
    with pytest.raises(UserError, match="downloading is turned off"):
        load_data("tiny-imagenet", str(tmp_path), download=False)
    with pytest.raises(UserError, match="could not be downloaded"):
        load_data("tiny-imagenet", str(tmp_path), download=True)


# ----------------------------------------------------------------------------------------------------
# Image folders

FOLDER_COLOURS = {"bird": (250, 10, 10), "cat": (10, 240, 10), "dog": (5, 5, 250)}


def build_folder(root: Path, size: int = 32) -> None:
    """A train/test image-folder tree with colour-coded classes, PNG and JPEG mixed."""
    for cls, colour in FOLDER_COLOURS.items():
        for i in range(4):
            write_image(root / "train" / cls / f"{i}.png", colour, size)
        write_image(root / "test" / cls / "a.png", colour, size)
        write_image(root / "test" / cls / "b.jpg", colour, size, "JPEG")
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")


def test_imagefolder_loads(tmp_path):
    build_folder(tmp_path)
    bundle = load_data("imagefolder", str(tmp_path))
    colours = list(FOLDER_COLOURS.values())
    assert bundle.info.classes == ("bird", "cat", "dog") and bundle.info.num_classes == 3
    assert bundle.info.image_size == 32
    assert bundle.train.images.shape == (12, 3, 32, 32) and bundle.test.images.shape == (6, 3, 32, 32)
    assert bundle.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(nearest_class(bundle.test.images, colours), bundle.test.labels)
    # PNGs are lossless, so the training pixels are exactly the colours written.
    expected = torch.tensor(colours, dtype=torch.uint8).repeat_interleave(4, 0)
    assert torch.equal(bundle.train.images[:, :, 5, 7], expected)
    pixels = bundle.train.images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    assert bundle.info.mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-9)
    assert bundle.info.std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-9)


def test_imagefolder_other_square_size(tmp_path):
    build_folder(tmp_path, size=48)
    assert load_data("imagefolder", str(tmp_path)).info.image_size == 48


def test_imagefolder_unreadable_image_named(tmp_path):
    build_folder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_data("imagefolder", str(tmp_path))


def test_imagefolder_mixed_sizes_names_odd_file(tmp_path):
    build_folder(tmp_path)
    write_image(tmp_path / "train" / "bird" / "0.png", (1, 2, 3), 16)
    with pytest.raises(UserError, match=r"bird.0\.png is 16x16 but most images are 32x32"):
        load_data("imagefolder", str(tmp_path))


def test_imagefolder_not_square(tmp_path):
    for cls in ("a", "b"):
        for split in ("train", "test"):
            path = tmp_path / split / cls / "x.png"
            path.parent.mkdir(parents=True)
            Image.new("RGB", (32, 24)).save(path)
    with pytest.raises(UserError, match="square"):
        load_data("imagefolder", str(tmp_path))


def test_imagefolder_empty_or_malformed(tmp_path):
    with pytest.raises(UserError, match="train"):
        load_data("imagefolder", str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        load_data("imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "test" / "cat").mkdir()
    with pytest.raises(UserError, match="only one class folder"):
        load_data("imagefolder", str(tmp_path))
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(UserError, match="contains no images"):
        load_data("imagefolder", str(tmp_path))
    write_image(tmp_path / "train" / "cat" / "1.png", (0, 0, 0))
    write_image(tmp_path / "train" / "dog" / "1.png", (0, 0, 0))
    write_image(tmp_path / "train" / "bird" / "1.png", (0, 0, 0))
    with pytest.raises(UserError, match="same class folders"):
        load_data("imagefolder", str(tmp_path))


def test_unknown_dataset_lists_names(tmp_path):
    with pytest.raises(UserError) as caught:
        load_data("mnist", str(tmp_path))
    assert all(name in str(caught.value) for name in DATASET_NAMES)


# ----------------------------------------------------------------------------------------------------
# Synthetic data and the validation hold-out


@pytest.fixture(scope="module")
def synthetic():
    return load_data("synthetic", "unused")


@pytest.fixture(scope="module")
def synthetic_val():
    # Scrambled global RNGs: neither the images nor the validation split may depend on them.
    np.random.seed(123)
    torch.manual_seed(456)
    random.seed(789)
    return load_data("synthetic", "unused", val_size=200)


def test_synthetic_shapes_and_balance(synthetic):
    info = synthetic.info
    assert info.num_classes == 10 and info.image_size == 32 and len(set(info.classes)) == 10
    assert synthetic.train.images.shape == (5000, 3, 32, 32) and synthetic.test.images.shape == (1000, 3, 32, 32)
    assert synthetic.train.images.dtype == torch.uint8 and synthetic.train.labels.dtype == torch.int64
    assert torch.bincount(synthetic.train.labels).tolist() == [500] * 10
    assert torch.bincount(synthetic.test.labels).tolist() == [100] * 10
    pixels = synthetic.train.images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    assert info.mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-9)
    assert info.std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-9)
    assert all(0.3 < m < 0.7 for m in info.mean) and all(0.15 < s < 0.35 for s in info.std)


def test_synthetic_not_separable_by_mean_colour(synthetic):
    # A nearest-centroid classifier on mean image colour should be far from perfect.
    def mean_colour(split):
        return split.images.float().mean((2, 3))

    train, test = mean_colour(synthetic.train), mean_colour(synthetic.test)
    centroids = torch.stack([train[synthetic.train.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(test, centroids).argmin(1) == synthetic.test.labels).float().mean()
    assert accuracy < 0.5


def test_synthetic_deterministic_and_validation_split(synthetic, synthetic_val):
    # Generated a second time under other global RNG states, the data and the split must be byte-identical.
    assert torch.equal(synthetic_val.test.images, synthetic.test.images)
    assert torch.equal(synthetic_val.test.labels, synthetic.test.labels)
    assert synthetic_val.info == synthetic.info
    torch.manual_seed(99)
    train, val = dataload._hold_out(synthetic.train, 10, 200)
    assert torch.equal(train.images, synthetic_val.train.images) and torch.equal(val.images, synthetic_val.val.images)
    assert torch.equal(train.labels, synthetic_val.train.labels) and torch.equal(val.labels, synthetic_val.val.labels)

    assert torch.bincount(val.labels).tolist() == [20] * 10 and len(train) == 4800

    def samples(split):
        return {(bytes(img.numpy()), int(y)) for img, y in zip(split.images, split.labels)}

    kept, held, original = samples(train), samples(val), samples(synthetic.train)
    assert len(original) == 5000
    assert not kept & held and kept | held == original


def test_validation_split_exact_indices():
    # Images that encode their own index make disjointness and coverage checkable exactly.
    n = 23
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 8)
    train, val = dataload._hold_out(Split(images, labels), 3, 12)
    train_ids, val_ids = train.images[:, 0, 0, 0].long(), val.images[:, 0, 0, 0].long()
    assert torch.bincount(val.labels).tolist() == [4, 4, 4]
    assert torch.equal(labels[val_ids], val.labels) and torch.equal(labels[train_ids], train.labels)
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(n))
    # The smallest class has 5 images, so 4 per class is the most it can give.
    with pytest.raises(UserError, match="at most 12"):
        dataload._hold_out(Split(images, labels), 3, 15)


def test_train_subset_is_balanced_and_after_validation(tmp_path):
    n = 30
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    split = Split(images, torch.arange(n) % 3)
    subset = dataload._train_subset(split, 3, 9)
    ids = subset.images[:, 0, 0, 0].long()
    assert torch.bincount(subset.labels).tolist() == [3, 3, 3] and torch.equal(split.labels[ids], subset.labels)
    assert torch.equal(dataload._train_subset(split, 3, 9).images, subset.images)

    build_folder(tmp_path)
    bundle = load_data("imagefolder", str(tmp_path), val_size=3, train_subset=6)
    assert len(bundle.val) == 3 and torch.bincount(bundle.train.labels).tolist() == [2, 2, 2]


def test_label_noise_makes_exactly_that_fraction_of_the_training_labels_wrong(tmp_path):
    split = make_split(1000, size=2, num_classes=10)
    noisy = dataload.noisy_labels(split, 10, 0.4)
    wrong = noisy.labels != split.labels
    assert int(wrong.sum()) == 400 and noisy.images is split.images
    # Each wrong label is another class, drawn among all nine others; the same call draws the same labels.
    assert set(((noisy.labels - split.labels) % 10)[wrong].tolist()) == set(range(1, 10))
    assert torch.equal(dataload.noisy_labels(split, 10, 0.4).labels, noisy.labels)
    assert dataload.noisy_labels(split, 10, 0.0) is split
    # Through load_data: after the subset, on the training split only, and the data's fingerprint tells it.
    build_folder(tmp_path)
    clean = load_data("imagefolder", str(tmp_path), train_subset=6)
    bundle = load_data("imagefolder", str(tmp_path), train_subset=6, label_noise=0.5)
    assert int((bundle.train.labels != clean.train.labels).sum()) == 3
    assert torch.equal(bundle.test.labels, clean.test.labels)
    assert dataload.data_fingerprint(bundle) != dataload.data_fingerprint(clean)


@pytest.mark.parametrize("val_size", [4, 12, -3])
def test_bad_val_size(tmp_path, val_size):
    # Three classes of four training images: 4 is not a multiple of 3, 12 would leave classes empty.
    build_folder(tmp_path)
    with pytest.raises(UserError, match="val_size"):
        load_data("imagefolder", str(tmp_path), val_size=val_size)
    assert len(load_data("imagefolder", str(tmp_path), val_size=9).val) == 9


# ----------------------------------------------------------------------------------------------------
# Augmentation


@pytest.mark.parametrize("size", [32, 64])
def test_augment_batch_matches_torchvision(size):
    split = make_split(12, size=size, seed=size)
    offsets, flips = draw_augment_params(12, torch.Generator().manual_seed(3))
    # Pin the corners and both flip values so the edge cases are always covered.
    offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])
    flips[:2] = torch.tensor([True, False])
    got = augment_batch(split.images, offsets, flips, MEAN, STD)
    assert got.dtype == torch.float32 and got.shape == (12, 3, size, size) and got.is_contiguous()
    for b in range(12):
        top, left = offsets[b].tolist()
        expected = reference_augment(split.images[b], top, left, bool(flips[b]), MEAN, STD)
        torch.testing.assert_close(got[b], expected, atol=1e-6, rtol=0)


def test_normalize_matches_torchvision():
    image = make_split(1).images[0]
    expected = TF.normalize(TF.to_tensor(Image.fromarray(image.permute(1, 2, 0).numpy())), MEAN, STD)
    torch.testing.assert_close(normalize(image, MEAN, STD), expected, atol=1e-6, rtol=0)
    assert normalize(image[None], MEAN, STD).shape == (1, 3, 32, 32)


def test_augment_params_uniform():
    n = 81 * 2 * 1000
    offsets, flips = draw_augment_params(n, torch.Generator().manual_seed(0))
    assert offsets.shape == (n, 2) and offsets.dtype == torch.int64 and flips.dtype == torch.bool
    assert offsets.min() == 0 and offsets.max() == 8
    cells = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    assert len(cells) == 81
    # Expected 2000 per cell with a binomial spread of about 44: 15% is a loose, non-flaky bound.
    assert ((cells - 2000).abs() < 300).all()
    assert abs(flips.float().mean().item() - 0.5) < 0.01


# ----------------------------------------------------------------------------------------------------
# Training and evaluation batches


def test_train_batches_device_epoch():
    split, info = make_split(37), make_info()
    x, y, idx, sizes = epoch(split, info, torch.Generator().manual_seed(0), batch_size=8)
    assert sizes == [8, 8, 8, 8, 5]
    assert sorted(idx.tolist()) == list(range(37))
    assert torch.equal(y, split.labels[idx]) and x.dtype == torch.float32 and x.shape == (37, 3, 32, 32)


def test_train_batches_drops_single_sample_tail():
    split, info = make_split(33), make_info()
    _, _, idx, sizes = epoch(split, info, torch.Generator().manual_seed(0), batch_size=8)
    assert sizes == [8, 8, 8, 8] and len(set(idx.tolist())) == 32


def test_train_batches_reproducible_from_generator_alone():
    split, info = make_split(40), make_info()
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    global_state = torch.get_rng_state()
    first = epoch(split, info, generator, batch_size=16)
    assert torch.equal(torch.get_rng_state(), global_state), "an epoch must not touch the global RNG"
    generator.set_state(state)
    second = epoch(split, info, generator, batch_size=16)
    assert all(torch.equal(a, b) for a, b in zip(first[:3], second[:3]))
    third = epoch(split, info, generator, batch_size=16)
    assert not torch.equal(first[2], third[2])


def test_train_batches_use_documented_draws():
    # Permutation first, then one draw of crop offsets and flips for the whole shard, all from the generator.
    split, info = make_split(20), make_info()
    x, _, idx, _ = epoch(split, info, torch.Generator().manual_seed(7), batch_size=6)
    replay = torch.Generator().manual_seed(7)
    order = torch.randperm(20, generator=replay)
    offsets, flips = draw_augment_params(20, replay)
    assert torch.equal(idx, order)
    torch.testing.assert_close(x, augment_batch(split.images[order], offsets, flips, MEAN, STD), atol=0, rtol=0)


def test_train_batches_rank_shards():
    split, info = make_split(50), make_info()
    shards = []
    for rank in range(3):
        # Every rank seeds its generator identically, as distributed training does.
        _, _, idx, _ = epoch(split, info, torch.Generator().manual_seed(11), batch_size=4, rank=rank, world_size=3)
        shards.append(idx.tolist())
    assert [len(s) for s in shards] == [16, 16, 16]
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 48


def test_device_copy_cached_per_split():
    split = make_split(4)
    meta = torch.device("meta")
    images, labels = batches._on_device(split, meta)
    assert images.device.type == "meta" and batches._on_device(split, meta)[0] is images
    key = (id(split), str(meta))
    assert key in batches._DEVICE_COPIES
    del split, images, labels
    gc.collect()
    assert key not in batches._DEVICE_COPIES


def test_loader_mode_matches_device_mode():
    split, info = make_split(21), make_info()
    device_x, _, device_idx, device_sizes = epoch(split, info, torch.Generator().manual_seed(3), batch_size=5)
    global_state = torch.get_rng_state()
    loader_x, loader_y, loader_idx, loader_sizes = epoch(
        split, info, torch.Generator().manual_seed(3), batch_size=5, mode="loader"
    )
    assert torch.equal(torch.get_rng_state(), global_state), "loader mode must not touch the global RNG"
    assert torch.equal(loader_idx, device_idx) and loader_sizes == device_sizes
    assert torch.equal(loader_y, split.labels[loader_idx]) and loader_x.shape == device_x.shape
    # Each loader image must be one of the 9x9x2 crops/flips augment_batch can make of the same image.
    grid = torch.cartesian_prod(torch.arange(9), torch.arange(9), torch.arange(2))
    for x, i in zip(loader_x[:6], loader_idx[:6]):
        copies = split.images[i].expand(len(grid), -1, -1, -1)
        candidates = augment_batch(copies, grid[:, :2], grid[:, 2].bool(), MEAN, STD)
        assert (candidates - x).abs().amax((1, 2, 3)).min() < 1e-6


def test_loader_mode_independent_of_workers():
    split, info = make_split(12), make_info()
    serial = epoch(split, info, torch.Generator().manual_seed(4), batch_size=4, mode="loader")
    parallel = epoch(split, info, torch.Generator().manual_seed(4), batch_size=4, mode="loader", num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(serial[:3], parallel[:3]))


def test_unknown_mode():
    with pytest.raises(UserError, match="mode"):
        train_batches(make_split(4), make_info(), 2, CPU, torch.Generator(), mode="gpu")


def test_eval_batches_cover_split_once_across_ranks():
    split, info = make_split(37), make_info()
    seen = []
    for rank in range(2):
        for x, y, idx in eval_batches(split, info, 5, CPU, rank=rank, world_size=2):
            assert len(idx) <= 5
            torch.testing.assert_close(x, normalize(split.images[idx], MEAN, STD), atol=0, rtol=0)
            assert torch.equal(y, split.labels[idx])
            seen += idx.tolist()
    assert seen == list(range(37))
