"""Checkpoint files: atomic writes survive kills and failures, loading never runs code, and foreign
teachers are accepted when they fit and refused, naming the first mismatch, when they do not."""
import ast
import os
import pickle
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import run_state
from checkpoints import FORMAT, atomic_save, load_model_file, safe_load
from console import ROOT, run_inprocess
from dih_utils import build_heads, fingerprint, heads_meta, load_heads, mount_shapes, save_heads
from errors import UserError
from faults import make_imagefolder, one_thread, recipe  # noqa: F401
from models_repo import build_model


class Evil:
    """Unpickling this would create the file ``marker``: a stand-in for any code a crafted file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path: Path, marker: Path, raw: bool) -> Path:
    """A checkpoint that runs code when unpickled: torch's zip format, or a bare pickle (protocol 4)."""
    payload = {"state_dict": {"fc.weight": Evil(marker)}}
    if raw:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path)
    return path


# ----------------------------------------------------------------------------- atomic writes

def test_a_kill_at_any_instant_leaves_the_old_or_the_new_file(tmp_path):
    path = tmp_path / "state.pth"
    versions = [{"v": torch.full((400_000,), float(i))} for i in range(2)]
    atomic_save(versions[0], path)
    for attempt in range(6):
        pid = os.fork()
        if pid == 0:  # the child rewrites the file as fast as it can until it is killed
            try:
                for i in range(10_000):
                    atomic_save(versions[i % 2], path)
            finally:
                os._exit(0)
        time.sleep(0.05 + 0.07 * attempt)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        value = safe_load(path, "state")["v"]
        assert any(torch.equal(value, v["v"]) for v in versions), "torn checkpoint"
    # A kill leaves at most a hidden temporary file beside it, never a half-written target.
    assert all(p.name == "state.pth" or (p.name.startswith(".state.pth.") and p.suffix == ".tmp")
               for p in tmp_path.iterdir())


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    atomic_save({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def fails_halfway(obj, f):
        f.write(b"PK half a checkpoint")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(checkpoints.torch, "save", fails_halfway)
    with pytest.raises(RuntimeError):
        atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pth"]


def test_an_os_error_while_writing_is_one_sentence_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    atomic_save({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "replace", no_space)
    with pytest.raises(UserError, match="No space left on device; the previous file is kept"):
        atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pth"]


def test_written_files_get_the_usual_permissions_not_private_ones(tmp_path):
    atomic_save({"v": torch.ones(1)}, tmp_path / "m.pth")
    mode = stat.S_IMODE((tmp_path / "m.pth").stat().st_mode)
    assert mode == 0o666 & ~checkpoints.UMASK


# ----------------------------------------------------------------------------- safe loading

@pytest.mark.parametrize("raw", [False, True], ids=["torch_zip", "bare_pickle"])
def test_a_crafted_pickle_is_refused_and_its_code_never_runs(tmp_path, raw):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "evil.pth", marker, raw)
    with pytest.raises(UserError) as info:
        safe_load(path, "teacher checkpoint")
    message = str(info.value)
    assert "was refused" in message and "\n" not in message
    if not raw:
        assert "system" in message  # names what it would have called
    assert not marker.exists()


def test_crafted_head_file_and_resume_state_are_refused(tmp_path):
    marker = tmp_path / "marker"
    teacher = build_model("res8", 4)
    meta = heads_meta("res8", 4, 16, "imagefolder", mount_shapes(teacher, 16), fingerprint(teacher))
    save_heads(build_heads(teacher, 4, 16), tmp_path / "heads", meta, epoch=1, selected_on="last epoch", seed=1)
    crafted(tmp_path / "heads" / "head_2.pth", marker, raw=False)
    with pytest.raises(UserError, match="head_2.pth' was refused"):
        load_heads(tmp_path / "heads", teacher, meta)
    state = crafted(tmp_path / "m.state.pth", marker, raw=True)
    with pytest.raises(UserError, match="resume state .* was refused"):
        run_state.load_resume_state(state, "kd", lambda s: None, {})
    assert not marker.exists()


def calls_to(tree: ast.AST, module: str, names: set) -> list:
    """Calls ``module.name(...)`` for ``name`` in ``names`` in a parsed file."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in names and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def test_every_torch_load_in_the_repository_is_weights_only():
    files = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert len(files) > 10
    unsafe = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in calls_to(tree, "torch", {"load"}):
            flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(f"{path.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True")
        for call in calls_to(tree, "pickle", {"load", "loads", "Unpickler"}):
            unsafe.append(f"{path.relative_to(ROOT)}:{call.lineno} pickle.{call.func.attr}")
        for call in calls_to(tree, "np", {"load"}):
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in call.keywords):
                unsafe.append(f"{path.relative_to(ROOT)}:{call.lineno} np.load with pickles")
    assert not unsafe, unsafe


# ----------------------------------------------------------------------------- teachers from other code

@pytest.fixture(scope="module")
def res8():
    """A res8 with non-default weights and buffers (so a silent non-load would show)."""
    torch.manual_seed(1)
    model = build_model("res8", 4)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return model


FOREIGN = {
    "plain": lambda s: s,
    "module_prefixed": lambda s: {f"module.{k}": v for k, v in s.items()},
    "wrapped_state_dict": lambda s: {"state_dict": s, "epoch": 200, "best_acc": 71.3},
    "wrapped_and_prefixed": lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 3},
    "wrapped_model": lambda s: {"model": s},
}


@pytest.mark.parametrize("layout", sorted(FOREIGN))
def test_foreign_teacher_state_dicts_are_accepted(tmp_path, res8, layout):
    torch.save(FOREIGN[layout](res8.state_dict()), tmp_path / "t.pth")
    model = build_model("res8", 4)
    load_model_file(tmp_path / "t.pth", model, "res8", 4, "teacher checkpoint")
    for key, value in res8.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


REFUSED = {
    "other_architecture": (lambda s: build_model("res14", 4).state_dict(), "unexpected key 'stages.0.1"),
    "other_class_count": (lambda s: build_model("res8", 10).state_dict(),
                          "'fc.weight' has shape (10, 64), expected (4, 64)"),
    "missing_key": (lambda s: {k: v for k, v in s.items() if k != "fc.bias"}, "key 'fc.bias' is missing"),
    "prefix_on_some_keys_only": (lambda s: {("module." + k if k.startswith("fc") else k): v for k, v in s.items()},
                                 "key 'fc.weight' is missing"),
    "not_a_tensor": (lambda s: {**s, "fc.bias": [0.0] * 4}, "'fc.bias' has shape list"),
    "not_a_state_dict": (lambda s: {"state_dict": "weights.bin"}, "holds no state dict"),
    "toolkit_record_without_fields": (lambda s: {"format": FORMAT, "kind": "model"}, "holds a None"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_teachers_that_do_not_fit_are_refused_naming_the_first_mismatch(tmp_path, res8, case):
    build, expected = REFUSED[case]
    torch.save(build(res8.state_dict()), tmp_path / "t.pth")
    with pytest.raises(UserError) as info:
        load_model_file(tmp_path / "t.pth", build_model("res8", 4), "res8", 4, "teacher checkpoint")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_console_evaluates_a_module_prefixed_teacher_like_the_original(tmp_path, one_thread, capsys):
    data = make_imagefolder(tmp_path / "data")
    args = [*recipe(data, epochs=1), "--training_type", "ce", "--path_to_save", tmp_path / "t.pth"]
    assert run_inprocess(args) == 0
    state = torch.load(tmp_path / "t.pth", weights_only=True)["state_dict"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    lines = []
    for path in (tmp_path / "t.pth", tmp_path / "ddp.pth"):
        capsys.readouterr()
        assert run_inprocess([*recipe(data), "--training_type", "test", "--saved_path", path]) == 0
        lines.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("res8")])
    assert lines[0] == lines[1] and len(lines[0]) == 1
