"""Checkpoint files: atomic writes, safe loading, and model files that carry what rebuilds them.

A model file is a dict ``{"format", "kind": "model", "arch", "num_classes", "dataset", "image_size",
"epoch", "state_dict", ...}``. Teacher files from other code are accepted when they are plain state
dicts (optionally with the ``module.`` prefix of DataParallel/DDP, bare or wrapped as ``{"state_dict": ...}``
or ``{"model": ...}``) whose keys and shapes match. Every file is written atomically and read with
``weights_only=True``.
"""
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from errors import UserError

FORMAT = "dih-toolkit/1"
# The process's file-creation mask (reading it means setting it; done once, before any thread starts).
UMASK = os.umask(0)
os.umask(UMASK)


def atomic_write(path, write) -> None:
    """Create ``path`` through ``write(binary_file)`` so that a kill at any instant leaves the old file or the new one.

    The bytes go to a temporary file in the same folder (a rename is only atomic within one file system),
    are flushed and fsynced, and only then replace ``path``; a failure removes the temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror or e}") from None
    try:
        # mkstemp creates the file private (0600); give it the permissions any new file of the user gets.
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, permissions changed mid-run: the old file is intact
            raise UserError(f"cannot write '{path}': {e.strerror or e}; the previous file is kept") from None
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def refusal_reason(error: Exception) -> str:
    """The part of a ``weights_only`` refusal that says what the file tried to load (torch's text is long)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to {found.group(1)}"
    found = re.search(r"Unsupported operand \w+", text)
    return found.group(0) if found else type(error).__name__


def safe_load(path, what: str) -> dict:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-sentence UserError.

    Only tensors and plain containers are unpickled, so a crafted file cannot run code while loading;
    torch's warnings (e.g. about an unusual pickle protocol) are silenced to keep errors to one line.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{what} '{path}' was refused: it holds objects other than tensors and plain containers "
                        f"({refusal_reason(e)}), which are not loaded because unpickling them can run code") from None
    except Exception as e:  # truncated, empty, unreadable or not a torch file at all
        raise UserError(f"{what} '{path}' cannot be read; it is truncated, unreadable or not a PyTorch checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} '{path}' is not a checkpoint dictionary")
    return obj


def model_record(model: nn.Module, arch: str, num_classes: int, dataset: str, image_size: int, **extra) -> dict:
    """The dict saved for a trained model: weights plus what is needed to rebuild and check them."""
    return {"format": FORMAT, "kind": "model", "arch": arch, "num_classes": num_classes, "dataset": dataset,
            "image_size": image_size, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **extra}


def strip_module_prefix(state: dict) -> dict:
    """Remove the ``module.`` prefix that DataParallel/DDP add to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state: dict, what: str, path) -> None:
    """Refuse a state dict whose keys or shapes differ from ``model``'s, naming the first mismatch."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise UserError(f"{what} '{path}' does not fit the model: key '{key}' is missing")
        if not torch.is_tensor(state[key]) or state[key].shape != value.shape:
            got = tuple(state[key].shape) if torch.is_tensor(state[key]) else type(state[key]).__name__
            raise UserError(f"{what} '{path}' does not fit the model: '{key}' has shape {got}, "
                            f"expected {tuple(value.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{what} '{path}' does not fit the model: unexpected key '{extra[0]}'")


def load_model_file(path, model: nn.Module, arch: str, num_classes: int, what: str = "checkpoint",
                    dataset: str | None = None) -> dict:
    """Load weights from ``path`` into ``model`` after checking architecture, classes and every key.

    Returns the file's metadata (an empty-ish dict for plain state dicts from other code).
    """
    obj = safe_load(path, what)
    if obj.get("format") == FORMAT:
        if obj.get("kind") != "model":
            raise UserError(f"{what} '{path}' is a {obj.get('kind')} file, not a model checkpoint")
        if obj.get("arch") != arch:
            raise UserError(f"{what} '{path}' holds a {obj.get('arch')}, not the requested {arch}")
        if obj.get("num_classes") != num_classes:
            raise UserError(f"{what} '{path}' was trained for {obj.get('num_classes')} classes, "
                            f"but the dataset has {num_classes}")
        if dataset is not None and obj.get("dataset") not in (None, dataset):
            raise UserError(f"{what} '{path}' was trained on {obj['dataset']}, not on {dataset}")
        state, meta = obj.get("state_dict"), {k: v for k, v in obj.items() if k != "state_dict"}
    else:
        # Other code saves the bare state dict, or wraps it as {"state_dict": ...} / {"model": ...}.
        state = obj.get("state_dict", obj.get("model", obj))
        meta = {"arch": arch, "num_classes": num_classes}
    if not isinstance(state, dict):
        raise UserError(f"{what} '{path}' holds no state dict")
    state = strip_module_prefix(state)
    check_state_dict(model, state, what, path)
    model.load_state_dict(state)
    return meta
