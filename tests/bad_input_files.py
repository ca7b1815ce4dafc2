"""Files for the bad-input cases (``bad_inputs``): copies of the fixture's teacher, heads and checkpoint with one
thing wrong, small image folders, and a pickle that would run code."""
import shutil

import torch

from dihkit.files.checkpoints import atomic_save
from faults import flip_tensor_byte
from models_repo import build_model


class Evil:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))



def write(path, content: bytes = b"") -> None:
    """Create ``path`` (and its folders) with ``content``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def save(obj, path) -> None:
    """torch.save ``obj`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def copy_heads(base, case, drop=(), extra=(), swap=None):
    """A copy of the fixture's heads in the case folder, with heads dropped, added or replaced."""
    folder = case / "heads"
    folder.mkdir()
    for i in (1, 2, 3):
        if i not in drop:
            source = base / "heads" / f"head_{swap[1] if swap and swap[0] == i else i}.pth"
            (folder / f"head_{i}.pth").write_bytes(source.read_bytes())
    for i in extra:
        (folder / f"head_{i}.pth").write_bytes((base / "heads" / "head_1.pth").read_bytes())
    return folder


def dataset(case, layout: dict) -> object:
    """An image-folder dataset in ``case/data`` from ``{relative path: image size or raw bytes}``."""
    from PIL import Image
    root = case / "data"
    root.mkdir()
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            Image.new("RGB", (content, content), (120, 30, 200)).save(path)
        elif content is not None:
            path.write_bytes(content)
    return root


def good_split(size=16, per_class=3, classes=("a", "b")) -> dict:
    """The files of a valid small split, per class."""
    return {f"{c}/{n}.png": size for c in classes for n in range(per_class)}


def prefixed(d: dict, prefix: str) -> dict:
    """``d`` with every key under ``prefix``."""
    return {f"{prefix}/{k}": v for k, v in d.items()}


def res_state(arch, classes) -> dict:
    """A plain state dict of a fresh registry model, as other code would save it."""
    return build_model(arch, classes).state_dict()


def copied(source, target):
    """A byte copy of ``source`` at ``target`` (folders created); returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def edited(source, target, poison=None, **fields):
    """A toolkit file ``source`` rewritten by the toolkit (so its digest is valid) at ``target``, with record
    ``fields`` replaced and ``poison`` ({state-dict key: value}) put in the first element of those tensors."""
    record = torch.load(source, weights_only=True)
    record.update(fields)
    for key, value in (poison or {}).items():
        record["state_dict"][key].view(-1)[0] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(record, target)
    return target


def flipped(source, target):
    """A copy of ``source`` with one byte inverted inside a tensor: it parses, but its digest no longer fits."""
    flip_tensor_byte(copied(source, target))


def other_images(base, case):
    """A copy of the fixture's data with one training image replaced by one of another class."""
    data = case / "data"
    shutil.copytree(base / "data", data)
    image = sorted((data / "train" / "class_1").iterdir())[0]
    image.write_bytes((data / "train" / "class_2" / image.name).read_bytes())
