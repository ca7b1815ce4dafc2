"""Checkpoint files: atomic writes, digests, safe loading, and model files that carry what rebuilds them.

A model file is a dict ``{"format", "kind": "model", "arch", "num_classes", "dataset", "image_size",
"epoch", "state_dict", ...}``. Teacher files from other code are accepted when they are plain state
dicts (optionally with the ``module.`` prefix of DataParallel/DDP, bare or wrapped as ``{"state_dict": ...}``
or ``{"model": ...}``) whose keys and shapes match; RepDistiller's and mdistiller's files and torchvision's
state dicts are renamed to the registry's layout by the rules of ``models_repo/upstream.py`` and checked
tensor by tensor. Every file is written atomically and read with
``weights_only=True``. Every dict the toolkit saves records ``tensors_sha256``, the digest of all its tensors'
bytes, and reading it checks that digest: bytes changed on disk are refused even when the file still parses.
"""
import copy
import hashlib
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from dihkit.files.atomic_files import atomic_torch_save
from dihkit.foundations.errors import UserError
from models_repo import MODELS, build_model
from models_repo.upstream import (BATCH_COUNTER, BENCHMARK_VGGS, from_earlier_layout, from_upstream, in_earlier_layout,
                                  is_upstream, source_of)

FORMAT = "dih-toolkit/1"
DIGEST_KEY = "tensors_sha256"
# Files already reported as carrying no digest: one notice per file and process, however often it is read.
_UNDIGESTED = set()
# Upstream files already reported as converted: one notice per file and process.
_CONVERTED = set()


def on_cpu(obj):
    """``obj`` with every tensor in its dicts, lists and tuples detached on the CPU (what a file holds)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same mapping type: a scheduler's Counter, a state dict's OrderedDict
        for key, value in obj.items():
            out[key] = on_cpu(value)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements, in order."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def digest_tensors(named, algorithm: str = "sha1") -> str:
    """Hex digest of ``(name, tensor)`` pairs: each name, then the tensor's bytes, in order."""
    digest = hashlib.new(algorithm)
    for key, value in named:
        digest.update(str(key).encode())
        digest.update(tensor_bytes(value))
    return digest.hexdigest()


def named_tensors(obj, prefix: str = ""):
    """Every tensor in nested dicts, lists and tuples, named by its path, dtype and shape, in order."""
    if torch.is_tensor(obj):
        yield f"{prefix} {obj.dtype} {tuple(obj.shape)}", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}/{i}")


def file_digest(obj: dict) -> str:
    """SHA-256 of every tensor of a checkpoint dict, its own digest entry left out."""
    return digest_tensors(named_tensors({k: v for k, v in obj.items() if k != DIGEST_KEY}), "sha256")


def atomic_save(obj, path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (``atomic_files.atomic_torch_save``); a dict records its digest."""
    if isinstance(obj, dict):
        obj = on_cpu(obj)
        obj[DIGEST_KEY] = file_digest(obj)
    atomic_torch_save(obj, path)


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
    if os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a folder, not a file")
    if not os.path.isfile(path):  # also a name too long to look up
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
    check_digest(obj, path, what)
    return obj


def check_digest(obj: dict, path: Path, what: str) -> None:
    """Refuse a file whose tensors differ from the digest recorded when it was written; a toolkit file
    written before digests were recorded is read with a one-line notice."""
    if DIGEST_KEY in obj:
        if obj[DIGEST_KEY] != file_digest(obj):
            raise UserError(f"{what} '{path}' is corrupted: its tensors do not match the digest recorded when it was "
                            f"written (its bytes changed on disk); restore it from a copy or produce it again")
    elif obj.get("format") == FORMAT and path.resolve() not in _UNDIGESTED:
        _UNDIGESTED.add(path.resolve())
        print(f"notice: {what} '{path}' records no digest (written before digests were), so corruption on disk "
              f"cannot be detected in it", file=sys.stderr)


def check_finite(state: dict, what: str, path, file_names: dict | None = None) -> None:
    """Refuse trained weights holding NaN or infinite values, naming the first such tensor as the file names it
    (``file_names``: this toolkit's name -> the file's, for a renamed file), this toolkit's name in brackets."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            name = (file_names or {}).get(key, key)
            ours = f" (this toolkit's '{key}')" if name != key else ""
            raise UserError(f"{what} '{path}' holds non-finite weights: tensor '{name}'{ours} has NaN or infinite "
                            f"values")


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


def read_model_file(path, arch: str | None, num_classes: int | None, what: str = "checkpoint",
                    dataset: str | None = None) -> tuple[dict, dict]:
    """The state dict and metadata of model file ``path``, refused when its record names another architecture,
    class count or dataset, or when a weight is not finite (``None``: not checked; plain state dicts from
    other code record nothing, so only their weights are checked here). A RepDistiller/mdistiller/torchvision
    state dict is renamed to ``arch``'s layout when ``arch`` is given (``convert_upstream``), a benchmark VGG
    in this toolkit's earlier layout to the current one; a plain state dict in this toolkit's layout that does
    not fit ``arch`` is refused naming the architectures it fits (``check_plain_fits``)."""
    obj = safe_load(path, what)
    recorded = obj.get("format") == FORMAT
    if recorded:
        state, meta = recorded_state(obj, path, arch, num_classes, what, dataset)
    else:
        # Other code saves the bare state dict, or wraps it as {"state_dict": ...} / {"model": ...}.
        state = obj.get("state_dict", obj.get("model", obj))
        meta = {"arch": arch, "num_classes": num_classes}
    if not isinstance(state, dict):
        raise UserError(f"{what} '{path}' holds no state dict")
    file_keys, source = list(state), f"{what} '{path}'"
    state = strip_module_prefix(state)
    if in_earlier_layout(state, meta.get("arch")):
        state = renamed_from_earlier_layout(state, meta["arch"], source)
    elif not recorded and arch is not None and is_upstream(state):
        state = convert_upstream(obj, state, arch, num_classes, source)
        meta.update(source=source_of(arch), upstream_epoch=obj.get("epoch"))
    elif not recorded and arch is not None and num_classes is not None:
        check_plain_fits(state, arch, num_classes, source)
    # Every step above renames in order, one name for one: the file's own names line up with the state's.
    check_finite(state, what, path, dict(zip(state, file_keys)))
    return state, meta


def recorded_state(obj: dict, path, arch: str | None, num_classes: int | None, what: str,
                   dataset: str | None) -> tuple[dict, dict]:
    """The state dict and metadata of a toolkit model record, refused when it names another kind of file,
    architecture, class count or dataset (``None``: not checked)."""
    if obj.get("kind") != "model":
        raise UserError(f"{what} '{path}' is a {obj.get('kind')} file, not a model checkpoint")
    if arch is not None and obj.get("arch") != arch:
        raise UserError(f"{what} '{path}' holds a {obj.get('arch')}, not the requested {arch}")
    if num_classes is not None and obj.get("num_classes") != num_classes:
        raise UserError(f"{what} '{path}' was trained for {obj.get('num_classes')} classes, "
                        f"but the dataset has {num_classes}")
    if dataset is not None and obj.get("dataset") not in (None, dataset):
        raise UserError(f"{what} '{path}' was trained on {obj['dataset']}, not on {dataset}")
    return obj.get("state_dict"), {k: v for k, v in obj.items() if k != "state_dict"}


def layout_of(arch: str, num_classes: int) -> dict:
    """Tensor name -> shape of registry model ``arch`` (built on the meta device: no memory, no RNG draws)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(arch, num_classes).state_dict().items()}


def fits(state: dict, layout: dict) -> bool:
    """Whether ``state`` holds exactly ``layout``'s tensors, shape for shape (batch-norm counters optional)."""
    return (all(k in layout and torch.is_tensor(v) and tuple(v.shape) == layout[k] for k, v in state.items())
            and all(k in state or k.endswith(BATCH_COUNTER) for k in layout))


def check_plain_fits(state: dict, arch: str, num_classes: int, source: str) -> None:
    """Refuse a plain state dict in this toolkit's layout that does not fit ``arch`` but fits other registry
    architectures, naming them: such a file records no architecture, and two networks can hold the same
    tensors (the seed's vgg11 and, in the earlier layout, vgg11_crd), so only the command can name it."""
    if fits(state, layout_of(arch, num_classes)):
        return
    fitting = [name for name in MODELS if fits(state, layout_of(name, num_classes))]
    earlier = [name for name in BENCHMARK_VGGS if in_earlier_layout(state, name)
               and fits(from_earlier_layout(state), layout_of(name, num_classes))]
    if fitting or earlier:
        names = fitting + [f"{name} (in this toolkit's earlier layout)" for name in earlier]
        raise UserError(f"{source} is a plain state dict, which records no architecture, and it does not fit a "
                        f"{arch}; its tensors fit {' and '.join(names)}: name its architecture (--teacher "
                        f"{' or --teacher '.join(fitting + earlier)})")


def renamed_from_earlier_layout(state: dict, arch: str, source: str) -> dict:
    """A benchmark VGG's tensors in this toolkit's earlier layout renamed to the current one (the same network:
    only the stages' grouping changed); one notice per file and process."""
    if source not in _CONVERTED:
        _CONVERTED.add(source)
        print(f"notice: {source} holds a {arch} in this toolkit's earlier layout (its fifth block a tail); its "
              f"tensors were renamed to the current one, whose stages end at RepDistiller's feature points",
              file=sys.stderr)
    return from_earlier_layout(state)


def convert_upstream(obj: dict, state: dict, arch: str, num_classes: int | None, source: str) -> dict:
    """A RepDistiller/mdistiller/torchvision state dict in the registry's ``arch`` layout, checked tensor by tensor
    against the model (names only while the class count is unknown); one notice per file and process."""
    expected = None
    if num_classes is not None:
        with torch.device("meta"):  # shapes without memory or RNG draws
            expected = {k: v.shape for k, v in build_model(arch, num_classes).state_dict().items()}
    converted = from_upstream(state, arch, expected, source)
    if source not in _CONVERTED:
        _CONVERTED.add(source)
        told = "".join(f", {key} {float(obj[key]):g}" for key in ("epoch", "accuracy")
                       if isinstance(obj.get(key), (int, float)) or (torch.is_tensor(obj.get(key)) and obj[key].numel() == 1))
        print(f"notice: {source} is a {source_of(arch)} {arch} file{told}: its {len(converted)} tensors "
              f"were renamed to this toolkit's layout and checked", file=sys.stderr)
    return converted


def file_arch(path, what: str, default: str) -> str:
    """The architecture a model file records, or ``default`` for a file from other code (which records none)."""
    obj = safe_load(path, what)
    return obj.get("arch", default) if obj.get("format") == FORMAT else default


def load_model_file(path, model: nn.Module, arch: str, num_classes: int, what: str = "checkpoint",
                    dataset: str | None = None) -> dict:
    """Load weights from ``path`` into ``model`` after checking architecture, classes, every key and that
    every weight is finite (``read_model_file``).

    Returns the file's metadata (an empty-ish dict for plain state dicts from other code).
    """
    state, meta = read_model_file(path, arch, num_classes, what, dataset)
    # As torch's load_state_dict does for files without the counters (PyTorch < 0.4.1): the model's own value.
    state = {**state, **{k: v for k, v in model.state_dict().items() if k.endswith(BATCH_COUNTER) and k not in state}}
    check_state_dict(model, state, what, path)
    model.load_state_dict(state)
    return meta
