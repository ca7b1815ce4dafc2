"""Faults during training: non-finite losses, repeated signals, and what --deterministic and --overwrite promise."""
import json
import os
import re
import signal

import pytest
import torch

import train_ce
from console import run_inprocess
from faults import make_imagefolder, one_thread, recipe, tree  # noqa: F401


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
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
    assert tree(tmp_path) == seen["tree"], "nothing is written after the fault"
    assert set(seen["tree"]) == {"m.state.pth", "m.best.pth"}
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
    assert all(entry["train_loss"] == entry["train_loss"] for entry in record["history"])  # no NaN in the record
    weights = torch.load(tmp_path / "m.pth", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def without_times(path) -> dict:
    """A result file without its wall-clock fields."""
    record = json.loads(path.read_text())
    record.pop("wall_time_s")
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

    Inject(monkeypatch, [4], two_signals)  # epoch 2, batch 1
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
