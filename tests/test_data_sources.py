"""Tests for what the data modules promise beyond reading formats: the known infos, the data fingerprint,
refusals that name the folder, where the decode cache goes, and tidying up after a failed download."""

from __future__ import annotations

import importlib.util
import os
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.utils
from PIL import Image, ImageOps

import dataload
from dihkit.sources import decode_cache
from dataload import DataBundle, Split, data_fingerprint, default_cache_dir, known_info, load_data
from dihkit.foundations.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"bird": (250, 10, 10), "cat": (10, 240, 10), "dog": (5, 5, 250)}


def write_image(path: Path, rgb, size: int = 16) -> None:
    """Save a solid-colour square PNG (lossless, so pixels read back exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), tuple(rgb)).save(path, format="PNG")


def build_folder(root: Path, per_class: int = 4, classes=COLOURS) -> Path:
    """A train/test image-folder tree whose pixel colours encode the class; returns ``root``."""
    for cls, colour in classes.items():
        for i in range(per_class):
            write_image(root / "train" / cls / f"{i}.png", colour)
        write_image(root / "test" / cls / "t.png", colour)
    return root


def files_under(folder: Path) -> set[Path]:
    """Every file below ``folder`` (hidden ones included)."""
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def quiet_home(tmp_path, monkeypatch):
    """Point HOME and XDG_CACHE_HOME into the test folder so no test can write to the real cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    return home


# ----------------------------------------------------------------------------------------------------
# known_info


def test_known_info_synthetic_matches_loaded():
    assert known_info("synthetic") == load_data("synthetic", "unused").info


def test_known_info_needs_no_files(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("known_info loaded a dataset")

    for loader in ("load_cifar", "load_tiny_imagenet", "load_image_tree", "load_synthetic"):
        monkeypatch.setattr(dataload, loader, no_loading)
    cifar10, cifar100, tiny = known_info("cifar10"), known_info("cifar100"), known_info("tiny-imagenet")
    assert (cifar10.num_classes, cifar10.image_size, cifar10.classes[0], cifar10.classes[-1]) == (10, 32, "airplane", "truck")
    assert cifar100.num_classes == 100 == len(set(cifar100.classes)) and cifar100.classes == tuple(sorted(cifar100.classes))
    assert cifar100.mean == (0.5071, 0.4865, 0.4409) and cifar100.std == (0.2673, 0.2564, 0.2762)
    assert (tiny.num_classes, tiny.image_size, tiny.classes) == (200, 64, ())
    assert tiny.mean == (0.4802, 0.4481, 0.3975) and tiny.std == (0.2770, 0.2691, 0.2821)
    assert known_info("synthetic").num_classes == 10
    assert known_info("imagefolder") is None and known_info("imagenet") is None and known_info("mnist") is None


# ----------------------------------------------------------------------------------------------------
# data_fingerprint


def test_fingerprint_same_data_same_value(tmp_path):
    first = build_folder(tmp_path / "a")
    value = data_fingerprint(load_data("imagefolder", str(first), val_size=3))
    assert len(value) == 40 and value == data_fingerprint(load_data("imagefolder", str(first), val_size=3))
    # The identity is of the pixels and labels, not of the path: an identical copy elsewhere is the same data.
    copy = build_folder(tmp_path / "b")
    assert data_fingerprint(load_data("imagefolder", str(copy), val_size=3)) == value


def test_fingerprint_changes_with_what_is_trained_on(tmp_path):
    root = build_folder(tmp_path / "data", per_class=6)
    base = data_fingerprint(load_data("imagefolder", str(root)))
    others = {
        data_fingerprint(load_data("imagefolder", str(root), val_size=3)),
        data_fingerprint(load_data("imagefolder", str(root), val_size=6)),
        data_fingerprint(load_data("imagefolder", str(root), train_subset=6)),
        data_fingerprint(load_data("imagefolder", str(root), val_size=3, train_subset=6)),
    }
    assert len(others) == 4 and base not in others
    # Same file names and counts, one image repainted: other contents, other value.
    write_image(root / "train" / "cat" / "2.png", (1, 2, 3))
    assert data_fingerprint(load_data("imagefolder", str(root))) != base
    # Another folder with another class list.
    other = build_folder(tmp_path / "other", per_class=6, classes={"ant": (1, 1, 1), "bee": (2, 2, 2), "cow": (3, 3, 3)})
    assert data_fingerprint(load_data("imagefolder", str(other))) != base


def test_fingerprint_cheap_and_sees_one_changed_image():
    info = known_info("cifar10")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50_000, 3, 32, 32), generator=g, dtype=torch.uint8)
    bundle = DataBundle(info, Split(images, torch.arange(50_000) % 10), None, Split(images[:10], torch.arange(10)))
    start = time.perf_counter()
    value = data_fingerprint(bundle)
    assert time.perf_counter() - start < 0.5
    images[12_345] = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
    assert data_fingerprint(bundle) != value


# ----------------------------------------------------------------------------------------------------
# Refusals that name the folder


def test_one_class_image_folder_refused(tmp_path):
    root = build_folder(tmp_path, classes={"cat": COLOURS["cat"]})
    with pytest.raises(UserError, match="only one class") as caught:
        load_data("imagefolder", str(root))
    assert str(root / "train") in str(caught.value) and "cat" in str(caught.value)


def test_one_class_tiny_imagenet_refused(tmp_path):
    tiny = tmp_path / "tiny-imagenet-200"
    (tiny / "val").mkdir(parents=True)
    (tiny / "wnids.txt").write_text("n01443537\n")
    (tiny / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\t0\t0\t63\t63\n")
    with pytest.raises(UserError, match="only one class") as caught:
        load_data("tiny-imagenet", str(tmp_path), download=False)
    assert str(tiny / "wnids.txt") in str(caught.value)


def load_split_helper():
    """scripts/split_imagefolder.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("split_imagefolder", ROOT / "scripts" / "split_imagefolder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_split_names_the_helper_that_works(tmp_path, capsys):
    # A folder of class folders, as downloaded: no train/ or test/.
    source = tmp_path / "photos"
    for cls, colour in COLOURS.items():
        for i in range(3):
            write_image(source / cls / f"{i}.png", colour)
    with pytest.raises(UserError) as caught:
        load_data("imagefolder", str(source))
    message = str(caught.value)
    assert f"`python3 scripts/split_imagefolder.py {source} {source}-split`" in message
    assert f"pass {source}-split as --data_dir" in message
    # The advice works as given: the helper sizes the test split from the tiny folder.
    assert load_split_helper().main([str(source), f"{source}-split"]) == 0
    bundle = load_data("imagefolder", f"{source}-split")
    assert (len(bundle.train), len(bundle.test)) == (6, 3)


def test_missing_test_split_names_the_helper(tmp_path):
    root = build_folder(tmp_path / "data")
    for image in (root / "test").rglob("*.png"):
        image.unlink()
    for folder in sorted((root / "test").iterdir()):
        folder.rmdir()
    (root / "test").rmdir()
    with pytest.raises(UserError, match="python3 scripts/split_imagefolder.py CLASS_FOLDERS NEW_FOLDER") as caught:
        load_data("imagefolder", str(root))
    assert str(root / "test") in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# Where the decode cache goes


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "dih-toolkit")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "dih-toolkit")
    # The XDG spec makes a relative value invalid.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "dih-toolkit")


def test_cache_written_to_cache_dir_only(tmp_path, quiet_home, monkeypatch, capsys):
    root = build_folder(tmp_path / "data")
    before = files_under(root)
    cache_dir = tmp_path / "cache"
    first = load_data("imagefolder", str(root), cache_dir=cache_dir)
    assert files_under(root) == before, "the data folder must not gain a file"
    (cache,) = files_under(cache_dir)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(cache) in out[0] and f"({cache.stat().st_size / 1e6:.1f} MB)" in out[0]

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(decode_cache, "_read_image", no_decoding)
    again = load_data("imagefolder", str(root), cache_dir=cache_dir)
    assert torch.equal(again.train.images, first.train.images) and capsys.readouterr().out == ""
    assert not quiet_home.exists()


def test_a_read_only_load_writes_its_cache_only_when_told(tmp_path, quiet_home, monkeypatch, capsys):
    """The mode a --resume loads in until its checks pass: the cache is read but not written; the bundle holds
    the write, which runs once, and a later load reads what it wrote."""
    root = build_folder(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    held = load_data("imagefolder", str(root), cache_dir=cache_dir, cache_read_only=True)
    assert not cache_dir.exists() and capsys.readouterr().out == ""
    held.write_held_cache()
    held.write_held_cache()  # a second call (a later phase or seed) writes nothing
    assert len(files_under(cache_dir)) == 1 and capsys.readouterr().out.count("Cached the decoded images") == 1
    monkeypatch.setattr(decode_cache, "_read_image", lambda path: pytest.fail(f"decoded {path} again"))
    again = load_data("imagefolder", str(root), cache_dir=cache_dir, cache_read_only=True)
    assert torch.equal(again.train.images, held.train.images) and again.held_writes == []


def test_jpeg_exif_orientation_is_not_applied_as_torchvisions_imagefolder(tmp_path, capsys):
    """A JPEG tagged "rotate 90 degrees" (EXIF orientation 6, as cameras write portrait photos) decodes to its
    stored pixels, exactly what torchvision's ImageFolder loader gives (docs/METHODS.md, "Your own images")."""
    from torchvision.datasets.folder import pil_loader
    root = build_folder(tmp_path / "data")
    (root / "train" / "bird" / "0.png").unlink()
    photo = root / "train" / "bird" / "0.jpg"  # the first training image: red left half, blue right half
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8, 0], pixels[:, 8:, 2] = 250, 250
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(photo, format="JPEG", quality=95, exif=exif)
    stored = np.asarray(pil_loader(str(photo)))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB"))
    assert not np.array_equal(upright, stored), "the tag would turn the image"
    decoded = load_data("imagefolder", str(root)).train.images[0]
    assert torch.equal(decoded, torch.from_numpy(stored.transpose(2, 0, 1).copy()))


def test_no_cache_dir_writes_nothing(tmp_path, quiet_home, capsys):
    root = build_folder(tmp_path / "data")
    # A cache file an older version left in the data folder is ignored, not read and not removed.
    old = root / ".dataload-cache.npz"
    old.write_bytes(b"old cache")
    before = {p: p.stat().st_mtime_ns for p in files_under(tmp_path)}
    load_data("imagefolder", str(root))
    assert {p: p.stat().st_mtime_ns for p in files_under(tmp_path)} == before
    assert capsys.readouterr().out == "" and not quiet_home.exists()


def test_folders_with_the_same_name_never_share_a_cache(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    one = build_folder(tmp_path / "one" / "data")
    two = build_folder(tmp_path / "two" / "data", classes={"ant": (1, 1, 1), "bee": (2, 2, 2)})
    load_data("imagefolder", str(one), cache_dir=cache_dir)
    second = load_data("imagefolder", str(two), cache_dir=cache_dir)
    assert len(files_under(cache_dir)) == 2 and second.info.classes == ("ant", "bee")
    assert all(p.name.startswith("data-") for p in files_under(cache_dir))
    assert load_data("imagefolder", str(one), cache_dir=cache_dir).info.classes == ("bird", "cat", "dog")


# ----------------------------------------------------------------------------------------------------
# A failed download leaves no folder behind


def partial_download(url, download_root, *args, **kwargs):
    """What an interrupted download leaves: the folder, a truncated archive, and an error."""
    Path(download_root).mkdir(parents=True, exist_ok=True)
    (Path(download_root) / os.path.basename(url)).write_bytes(b"truncated")
    raise urllib.error.URLError("connection reset")


@pytest.fixture
def interrupted(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", partial_download)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", partial_download)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny-imagenet"])
def test_failed_download_removes_folders_it_made(tmp_path, interrupted, name):
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(UserError, match="could not be downloaded"):
        load_data(name, str(data_dir), download=True)
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()


def test_failed_download_keeps_an_existing_folder(tmp_path, interrupted):
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's")
    with pytest.raises(UserError, match="could not be downloaded"):
        load_data("tiny-imagenet", str(tmp_path), download=True)
    assert mine.read_text() == "the user's"
