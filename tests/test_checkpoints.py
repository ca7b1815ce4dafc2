"""Checkpoint files: atomic writes survive kills and failures, loading never runs code, digests catch bytes
changed on disk, non-finite weights and stray head files are refused, the output lock holds while its
process lives, and foreign teachers are accepted when they fit and refused, naming the first mismatch,
when they do not."""
import ast
import collections
import errno
import os
import pickle
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from dihkit.files import atomic_files, checkpoints
from dihkit.runs import run_state
from dihkit.files.checkpoints import DIGEST_KEY, FORMAT, atomic_save, load_model_file, model_record, safe_load
from console import ROOT, run_inprocess
from dih_utils import build_heads, fingerprint, heads_meta, list_heads, load_heads, mount_shapes, save_heads
from dihkit.foundations.errors import UserError
from faults import flip_tensor_byte, hold_lock, make_imagefolder, recipe
from models_repo import build_model
from dihkit.files.output_lock import OutputLock, lock_file, remove_stray_temps


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

    def denied(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoints.os, "replace", denied)
    with pytest.raises(UserError, match="Permission denied; the previous file is kept"):
        atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pth"]


def test_a_full_disk_names_the_folder_and_the_bytes_the_file_needed(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    atomic_save({"v": torch.ones(3)}, path)
    before = path.read_bytes()
    written = {}

    def full(fd):  # the data reached the page cache; the disk has no room when it is flushed
        written["size"] = os.fstat(fd).st_size
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    with pytest.raises(UserError) as info:
        atomic_save({"v": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert str(info.value).startswith(f"no space left in '{tmp_path}' to write 'm.pth' ({written['size']:,} bytes")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pth"]


def test_written_files_get_the_usual_permissions_not_private_ones(tmp_path):
    atomic_save({"v": torch.ones(1)}, tmp_path / "m.pth")
    mode = stat.S_IMODE((tmp_path / "m.pth").stat().st_mode)
    assert mode == 0o666 & ~atomic_files.UMASK


# ----------------------------------------------------------------------------- digests and finite weights

def test_every_saved_dict_records_a_digest_that_survives_containers_of_any_kind(tmp_path):
    counts = collections.Counter({3: 1, 6: 2})  # what a MultiStepLR state holds
    atomic_save({"format": FORMAT, "w": torch.arange(5.0), "nested": [{"b": torch.ones(2, dtype=torch.bool)}],
                 "milestones": counts}, tmp_path / "x.pth")
    loaded = safe_load(tmp_path / "x.pth", "checkpoint")
    assert len(loaded[DIGEST_KEY]) == 64 and loaded["milestones"] == counts
    assert type(loaded["milestones"]) is collections.Counter


def test_a_flipped_byte_inside_a_tensor_parses_but_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "t.pth"
    atomic_save(model_record(build_model("res8", 4), "res8", 4, "imagefolder", 16), path)
    flip_tensor_byte(path)
    assert torch.load(path, weights_only=True)["arch"] == "res8", "the damaged file still parses"
    with pytest.raises(UserError, match=f"teacher checkpoint '{path}' is corrupted"):
        load_model_file(path, build_model("res8", 4), "res8", 4, "teacher checkpoint")


def test_a_toolkit_file_without_digest_loads_with_one_notice(tmp_path, capsys):
    path = tmp_path / "old.pth"
    model = build_model("res8", 4)
    torch.save(model_record(model, "res8", 4, "imagefolder", 16), path)  # as files were written before digests
    for _ in range(2):
        load_model_file(path, build_model("res8", 4), "res8", 4, "teacher checkpoint")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"notice: teacher checkpoint '{path}' records no digest")
    torch.save(model.state_dict(), tmp_path / "foreign.pth")  # other code's files never had one: no notice
    load_model_file(tmp_path / "foreign.pth", build_model("res8", 4), "res8", 4, "teacher checkpoint")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("key, value", [("fc.weight", float("nan")), ("stages.0.0.bn1.running_var", float("inf"))])
def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(tmp_path, key, value):
    state = build_model("res8", 4).state_dict()
    state[key].view(-1)[0] = value
    atomic_save({"state_dict": state}, tmp_path / "t.pth")
    with pytest.raises(UserError, match=f"'{tmp_path / 't.pth'}' holds non-finite weights: tensor '{key}'"):
        load_model_file(tmp_path / "t.pth", build_model("res8", 4), "res8", 4, "teacher checkpoint")


# ----------------------------------------------------------------------------- heads folders and output locks

@pytest.mark.parametrize("stray", ["head_02.pth", "head_0.pth", "head_x.pth", "head_.pth"])
def test_a_file_named_like_a_head_but_not_exactly_is_refused(tmp_path, stray):
    teacher = build_model("res8", 4)
    meta = heads_meta("res8", 4, 16, "imagefolder", mount_shapes(teacher, 16), fingerprint(teacher))
    save_heads(build_heads(teacher, 4, 16), tmp_path, meta, epoch=1, selected_on="last epoch", seed=1)
    assert sorted(list_heads(tmp_path)) == [1, 2, 3]
    (tmp_path / stray).write_bytes((tmp_path / "head_2.pth").read_bytes())
    with pytest.raises(UserError, match=f"holds '{stray}', which looks like a head file but is not named"):
        load_heads(tmp_path, teacher, meta)


def test_an_output_lock_refuses_a_second_claim_until_its_process_dies(tmp_path):
    path = tmp_path / "new" / "m.pth"
    proc = hold_lock(path)
    try:
        assert lock_file(path).read_text().strip() == str(proc.pid)
        for attempt in (OutputLock([path]).check_free, OutputLock([tmp_path / "x.pth", path]).acquire):
            with pytest.raises(UserError, match=f"output '{path}' is claimed by another run .*PID {proc.pid}"):
                attempt()
        assert not lock_file(tmp_path / "x.pth").exists(), "a refused claim lets go of what it had taken"
    finally:
        proc.kill()
        proc.wait()
    assert lock_file(path).exists(), "a killed holder leaves its lock file"
    lock = OutputLock([path])
    lock.check_free()
    lock.acquire()  # nobody holds it any more: no cleanup needed
    assert lock_file(path).read_text().strip() == str(os.getpid())
    lock.release()
    assert not lock_file(path).exists()


def test_a_claim_removes_the_folders_it_created_when_they_stay_empty(tmp_path):
    lock = OutputLock([tmp_path / "a" / "b" / "m.pth", tmp_path / "c.pth"])
    lock.acquire()
    assert (tmp_path / "a" / "b" / ".m.pth.lock").is_file()
    lock.release()
    assert os.listdir(tmp_path) == []


def test_stray_temporary_files_of_an_output_are_found_and_only_they(tmp_path):
    mine = [tmp_path / ".m.pth.abcd_123.tmp", tmp_path / ".m.pth.zzzzzzzz.tmp"]
    others = [tmp_path / ".m2.pth.abcdefgh.tmp", tmp_path / ".m.pth.lock", tmp_path / "m.pth.abcdefgh.tmp",
              tmp_path / ".m.pth.short.tmp"]
    heads = tmp_path / "heads"
    (heads / "best").mkdir(parents=True)
    inside = [heads / ".head_1.pth.a1b2c3d4.tmp", heads / "best" / ".state.pth.qwertyui.tmp"]
    for p in mine + others + inside:
        p.write_bytes(b"half a file")
    assert sorted(remove_stray_temps(tmp_path / "m.pth", inside=False)) == sorted(mine)
    assert sorted(remove_stray_temps(heads, inside=True)) == sorted(inside)
    assert not any(p.exists() for p in mine + inside) and all(p.exists() for p in others)


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
    "other_architecture": (lambda s: build_model("res14", 4).state_dict(),
                           "does not fit a res8; its tensors fit res14 and resnet14: name its architecture "
                           "(--teacher res14 or --teacher resnet14)"),
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


def test_console_evaluates_a_module_prefixed_teacher_like_the_original(tmp_path, capsys):
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
