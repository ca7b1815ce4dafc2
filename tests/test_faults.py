"""Faults during training and around it: non-finite losses, repeated signals, what --deterministic and --overwrite
promise, and the eight classes of issue 12 (colliding outputs, two runs on one output, corrupted and
non-finite trained inputs, epochs of skipped batches, resumes on other data, a full disk, stray temporary
files, and refused runs that must write nothing).
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager

import pytest
import torch

from dihkit.files import checkpoints
import train_ce
from dihkit.files.checkpoints import atomic_save, model_record
from console import TINY, run_inprocess
from dih_utils import build_heads, fingerprint, heads_meta, mount_shapes, save_heads
from faults import flip_tensor_byte, make_imagefolder, recipe, start, tree, wait_for_state
from models_repo import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny image-folder dataset (its decoding cache written once, here)."""
    return make_imagefolder(tmp_path_factory.mktemp("faults") / "data")


def ce(data, folder, *extra) -> list:
    """Three epochs of CE on the recipe, written to ``folder/m.pth``."""
    return [*recipe(data), "--training_type", "ce", "--path_to_save", folder / "m.pth", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted deterministic run, written with a relative path from its own working folder."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert run_inprocess([*recipe(data), "--training_type", "ce", "--path_to_save", "m.pth"]) == 0
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    return folder


class Inject:
    """Wrap CE's forward: at the given calls (1-based, over the whole run) do ``action`` first."""

    def __init__(self, monkeypatch, calls, action):
        self.n, self.calls, self.action = 0, set(calls), action
        forward = train_ce.CrossEntropy.forward

        def wrapped(method, x, y, idx):
            self.n += 1
            loss, logits = forward(method, x, y, idx)
            if self.n in self.calls:
                loss = self.action(loss)
            return loss, logits

        monkeypatch.setattr(train_ce.CrossEntropy, "forward", wrapped)


def one_line(err: str) -> str:
    """The single line a failed run prints on stderr (tqdm's bar lines aside)."""
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    seen = {}

    def poison(loss):
        seen["tree"] = tree(tmp_path)  # epoch 1's checkpoint and best model, as they are before the fault
        return loss * float("nan")

    Inject(monkeypatch, [5], poison)  # epoch 2, batch 2 (three batches an epoch)
    code = run_inprocess(ce(data, tmp_path))
    line = one_line(capsys.readouterr().err)
    assert code == 3
    assert "became NaN or infinite at epoch 2, batch 2" in line and "m.state.pth' is kept" in line
    locks = {name for name in seen["tree"] if name.endswith(".lock")}
    assert locks == {".m.pth.lock", ".m.best.pth.lock", ".m.state.pth.lock", ".m.json.lock"}, "the run's claim"
    assert tree(tmp_path) == {k: v for k, v in seen["tree"].items() if k not in locks}, "nothing written after it"
    assert set(seen["tree"]) - locks == {"m.state.pth", "m.best.pth"}
    state = torch.load(tmp_path / "m.state.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["method"].values()
                                       if v.is_floating_point())


def test_diverging_learning_rate_stops_in_the_first_epoch_without_writing(data, tmp_path, capsys):
    code = run_inprocess(ce(data, tmp_path, "--lr", "1e30"))
    line = one_line(capsys.readouterr().err)
    assert code == 3 and re.search(r"at epoch 1, batch [23];", line) and "no checkpoint had been written" in line
    assert tree(tmp_path) == {}


def test_nan_policy_skip_drops_and_counts_the_batches(data, tmp_path, monkeypatch):
    Inject(monkeypatch, [2, 5], lambda loss: loss * float("inf"))
    assert run_inprocess(ce(data, tmp_path, "--nan_policy", "skip")) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["nan_skipped"] == 2 and record["complete"]
    assert [entry["nan_skipped"] for entry in record["history"]] == [1, 1, 0]
    assert all(entry["train_loss"] == entry["train_loss"] for entry in record["history"])  # no NaN in the record
    weights = torch.load(tmp_path / "m.pth", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def without_times(path) -> dict:
    """A result file without its wall-clock fields."""
    record = json.loads(path.read_text())
    record.pop("wall_time_s")
    record.pop("cwd")
    for entry in record["history"]:
        entry.pop("epoch_time_s")
    return record


def same_tensors(a, b) -> bool:
    """Two model files hold identical weights and buffers."""
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deterministic_runs_give_identical_result_files(data, reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_inprocess([*recipe(data), "--training_type", "ce", "--path_to_save", "m.pth"]) == 0
    assert without_times(tmp_path / "m.json") == without_times(reference / "m.json")
    assert same_tensors(tmp_path / "m.pth", reference / "m.pth")


def test_a_second_signal_stops_at_once_and_resume_still_matches(data, reference, tmp_path, monkeypatch, capsys):
    seen = {}

    def two_signals(loss):
        seen["state"] = (tmp_path / "m.state.pth").read_bytes()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    # Epoch 2, batch 2: between batches, where a first signal alone would wait for the batch to end.
    Inject(monkeypatch, [5], two_signals)
    code = run_inprocess(ce(data, tmp_path))
    assert code == 130 and "stopped at once" in one_line(capsys.readouterr().err)
    assert (tmp_path / "m.state.pth").read_bytes() == seen["state"], "epoch 1's checkpoint is intact"
    assert not (tmp_path / "m.pth").exists()
    monkeypatch.undo()
    assert run_inprocess(ce(data, tmp_path, "--resume")) == 0
    assert same_tensors(tmp_path / "m.pth", reference / "m.pth")


def test_overwrite_replaces_a_finished_run_and_drops_its_stale_files(data, tmp_path):
    assert run_inprocess(ce(data, tmp_path)) == 0
    (tmp_path / "m.state.pth").write_bytes(b"stale checkpoint of an older run")
    assert run_inprocess(ce(data, tmp_path, "--epochs", "1", "--schedule", "1", "--val_size", "0")) == 2
    assert run_inprocess(ce(data, tmp_path, "--epochs", "1", "--schedule", "1", "--val_size", "0",
                            "--overwrite")) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["last_epoch"] == 1 and "best" not in record["outputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pth"], "stale state and best removed"


# ----------------------------------------------------------------------------- issue 12: one test per class

def one_error(capsys) -> str:
    """The one line of a refused run's stderr."""
    return one_line(capsys.readouterr().err)


def fake_teacher(path, arch="res8", poison=None) -> None:
    """A fresh ``arch`` teacher file for the tiny image folder, written by the toolkit (so its digest is valid),
    with ``poison`` ({state-dict key: value}) put in the first element of those tensors."""
    model = build_model(arch, 4)
    record = model_record(model, arch, 4, "imagefolder", 16)
    for key, value in (poison or {}).items():
        record["state_dict"][key].view(-1)[0] = value
    atomic_save(record, path)


def test_outputs_that_collide_are_refused_before_any_work(data, tmp_path, capsys):
    assert run_inprocess([*recipe(data), "--training_type", "ce", "--path_to_save", tmp_path / "run.json"]) == 2
    assert f"the model '{tmp_path}/run.json' is the same path as the result file" in one_error(capsys)
    fake_teacher(tmp_path / "t.pth")
    teacher, before = (tmp_path / "t.pth").read_bytes(), tree(tmp_path)
    code = run_inprocess([*recipe(data), "--training_type", "kd", "--saved_path", tmp_path / "t.pth",
                          "--path_to_save", tmp_path / "x" / ".." / "t.pth", "--overwrite"])
    assert code == 2 and "is the same path as the input --saved_path" in one_error(capsys)
    assert tree(tmp_path) == before and (tmp_path / "t.pth").read_bytes() == teacher


def test_a_second_run_on_a_live_runs_output_is_refused_naming_it_and_resume_after_sigkill_works(tmp_path, capsys):
    out = tmp_path / "m_s9.pth"
    args = [*TINY, "--teacher", "res8", "--epochs", "4", "--schedule", "3", "--training_type", "ce"]
    proc = start([*args, "--path_to_save", out], tmp_path)
    try:
        wait_for_state(proc, out.with_suffix(".state.pth"))
        # The same command, its --resume, and a command of two seeds whose second seed writes the same output.
        for attempt in ([out], [out, "--resume"], [tmp_path / "m.pth", "--seed", "3", "9"]):
            assert run_inprocess([*args, "--path_to_save", *attempt]) == 2
            assert f"output '{out}' is claimed by another run that is still going (PID {proc.pid})" in one_error(capsys)
        assert proc.poll() is None, "the first run ended before the others were tried"
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".m_s9.pth.lock").exists(), "SIGKILL leaves the lock file, but nobody holds it"
    assert run_inprocess([*args, "--path_to_save", out, "--resume"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_s9.json", "m_s9.pth"], "a clean exit removes the locks"


def test_a_teacher_with_flipped_bytes_is_refused_before_any_data_is_read(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "fresh")  # never decoded: a run that read it would leave a cache
    fake_teacher(tmp_path / "t.pth")
    flip_tensor_byte(tmp_path / "t.pth")
    before = tree(tmp_path)
    code = run_inprocess([*recipe(data), "--training_type", "kd", "--saved_path", tmp_path / "t.pth",
                          "--cache_dir", tmp_path / "cache", "--path_to_save", tmp_path / "s.pth"])
    assert code == 2 and f"teacher checkpoint '{tmp_path}/t.pth' is corrupted" in one_error(capsys)
    assert tree(tmp_path) == before


def test_non_finite_teacher_or_heads_are_refused_naming_the_file_and_the_tensor(data, tmp_path, capsys):
    fake_teacher(tmp_path / "nan.pth", poison={"fc.weight": float("nan")})
    assert run_inprocess([*recipe(data), "--training_type", "kd", "--saved_path", tmp_path / "nan.pth",
                          "--path_to_save", tmp_path / "s.pth"]) == 2
    assert "nan.pth' holds non-finite weights: tensor 'fc.weight'" in one_error(capsys)
    fake_teacher(tmp_path / "t.pth")
    teacher = build_model("res8", 4)
    teacher.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True)["state_dict"])
    heads = build_heads(teacher, 4, 16)
    with torch.no_grad():
        heads[1].fc.bias[2] = float("inf")
    meta = heads_meta("res8", 4, 16, "imagefolder", mount_shapes(teacher, 16), fingerprint(teacher))
    save_heads(heads, tmp_path / "heads", meta, epoch=1, selected_on="last epoch", seed=5)
    assert run_inprocess([*recipe(data), "--training_type", "dih", "--saved_path", tmp_path / "t.pth", "--path_to_save",
                          tmp_path / "s.pth", "--saved_intermediates_directory", tmp_path / "heads"]) == 2
    assert "head_2.pth' holds non-finite weights: tensor 'fc.bias'" in one_error(capsys)
    assert not (tmp_path / "s.pth").exists()


@pytest.mark.parametrize("calls, skipped", [([4, 5, 6], 3), ([4, 6], 2)])
def test_an_epoch_that_skips_more_than_half_its_batches_stops_and_never_completes(data, tmp_path, monkeypatch,
                                                                                 capsys, calls, skipped):
    seen = {}

    def poison(loss):
        seen.setdefault("state", (tmp_path / "m.state.pth").read_bytes())
        return loss * float("nan")

    Inject(monkeypatch, calls, poison)  # epoch 2 (three batches an epoch)
    assert run_inprocess(ce(data, tmp_path, "--nan_policy", "skip")) == 3
    line = one_error(capsys)
    assert f"{skipped} of the 3 batches of epoch 2 had a NaN or infinite loss and were skipped" in line
    assert "m.state.pth' is kept" in line and (tmp_path / "m.state.pth").read_bytes() == seen["state"]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "m.pth").exists()


def test_resume_on_other_training_data_is_refused(data, tmp_path, monkeypatch, capsys):
    Inject(monkeypatch, [4], lambda loss: os.kill(os.getpid(), signal.SIGINT) or loss)  # epoch 2, batch 1
    assert run_inprocess(ce(data, tmp_path)) == 128 + signal.SIGINT
    monkeypatch.undo()
    capsys.readouterr()
    other = tmp_path / "other"
    shutil.copytree(data, other)
    image = sorted((other / "train" / "class_1").iterdir())[0]
    image.write_bytes((other / "train" / "class_2" / image.name).read_bytes())  # one image of another class
    before = tree(tmp_path)
    assert run_inprocess(ce(data, tmp_path, "--resume", "--train_subset", "60")) == 2
    assert "--resume refused: --train_subset was 0 in the earlier run" in one_error(capsys)
    assert run_inprocess(ce(other, tmp_path, "--resume")) == 2
    assert "--resume refused: the training data differ from those of the earlier run" in one_error(capsys)
    assert tree(tmp_path) == before


@contextmanager
def small_disk(folder, size: int):
    """``folder`` with only ``size`` bytes of room: a tmpfs when this process may mount one, else a disk whose
    fsync reports ENOSPC once the files in ``folder`` would pass ``size`` bytes."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                    str(folder)], capture_output=True).returncode == 0
    if mounted:
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    fsync = checkpoints.os.fsync

    def full(fd):
        if sum(p.stat().st_size for p in folder.iterdir()) > size:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints.os, "fsync", full)
        yield


def test_a_full_disk_keeps_the_last_checkpoint_and_names_the_folder_and_the_bytes(data, tmp_path, monkeypatch, capsys):
    seen = {}

    def measure(loss):
        seen["size"] = (tmp_path / "probe" / "m.state.pth").stat().st_size
        return loss * float("nan")

    Inject(monkeypatch, [4], measure)  # the size of an epoch's checkpoint, on an ordinary disk
    assert run_inprocess(ce(data, tmp_path / "probe", "--val_size", "0")) == 3
    capsys.readouterr()
    monkeypatch.undo()
    state_size, disk = seen["size"], tmp_path / "disk"
    with small_disk(disk, state_size * 3 // 2 + 65536):  # room for one checkpoint, not for it and its successor
        Inject(monkeypatch, [4], lambda loss: seen.setdefault("state", (disk / "m.state.pth").read_bytes()) and loss)
        assert run_inprocess(ce(data, disk, "--val_size", "0")) == 2
        line = one_error(capsys)
        needed = int(re.search(r"\(([\d,]+) bytes needed\)", line).group(1).replace(",", ""))
        assert f"no space left in '{disk}' to write 'm.state.pth'" in line and abs(needed - state_size) < 1000
        assert (disk / "m.state.pth").read_bytes() == seen["state"], "epoch 1's checkpoint is whole"
        assert sorted(p.name for p in disk.iterdir()) == ["m.state.pth"], "no temporary file, no lock left"


def test_stray_temporary_files_of_a_killed_write_are_removed_by_the_next_run(data, tmp_path, capsys):
    strays = [tmp_path / ".m.pth.k1ll3d_x.tmp", tmp_path / ".m.state.pth.abcdefgh.tmp"]
    unrelated = tmp_path / ".other.pth.abcdefgh.tmp"
    for p in [*strays, unrelated]:
        p.write_bytes(b"half a checkpoint")
    assert run_inprocess(ce(data, tmp_path, "--epochs", "1", "--schedule", "1")) == 0
    out = capsys.readouterr().out
    assert all(f"removed '{p}', left by a write that was interrupted" in out for p in strays)
    assert not any(p.exists() for p in strays) and unrelated.exists()


def test_a_run_refused_for_its_teacher_writes_nothing_not_even_a_data_cache(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "fresh")
    fake_teacher(tmp_path / "t.pth", arch="res14")
    before, folder_time = tree(tmp_path), tmp_path.stat().st_mtime_ns
    code = run_inprocess([*recipe(data), "--training_type", "kd", "--saved_path", tmp_path / "t.pth",
                          "--cache_dir", tmp_path / "cache", "--path_to_save", tmp_path / "runs" / "s.pth"])
    assert code == 2 and "holds a res14, not the requested res8" in one_error(capsys)
    assert tree(tmp_path) == before and tmp_path.stat().st_mtime_ns == folder_time, "nothing created, not even a lock"
