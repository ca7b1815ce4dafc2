"""A newcomer's first hour: the defaults a short run relies on, the image-folder cache, and rerunning a run
from its result file alone."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import final_test
from console import ROOT, run_inprocess
from test_dataload import build_folder

# A short run as a newcomer types it: no --schedule, so the console's default applies.
SHORT = ["--dataset", "synthetic", "--train_subset", "100", "--epochs", "1", "--seed", "3", "--gpu_id", "cpu",
         "--training_type", "ce", "--teacher", "res8"]


def settings(*argv):
    """The console's typed settings for ``argv``."""
    return final_test.make_settings(final_test.build_parser().parse_args(list(argv)))


def read(path):
    """A result file."""
    return json.loads(Path(path).read_text())


def test_the_schedule_follows_the_epochs_unless_given():
    assert settings("--epochs", "200").optim.milestones == (60, 120, 180)
    assert settings("--epochs", "10").optim.milestones == (3, 6, 9)
    assert settings("--epochs", "2").optim.milestones == (1, 2)
    assert settings("--epochs", "10", "--schedule", "5", "7").optim.milestones == (5, 7)


def test_one_epoch_runs_without_a_schedule_and_prints_its_milestones(tmp_path, capsys):
    assert run_inprocess([*SHORT, "--path_to_save", tmp_path / "m.pth"]) == 0
    assert "lr milestones [1] of 1 epochs" in capsys.readouterr().out
    assert read(tmp_path / "m.json")["args"]["schedule"] == [1]


def files(folder: Path) -> dict:
    """Every path under ``folder`` with its modification time (empty when it does not exist)."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """A small train/test image-folder tree, and a home cache folder that must stay empty."""
    build_folder(tmp_path / "images")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
    return tmp_path / "images"


def image_run(folder, out, *extra):
    """One epoch of res8 on the image folder through the console; its exit code."""
    return run_inprocess(["--dataset", "imagefolder", "--data_dir", folder, "--epochs", "1", "--seed", "3",
                          "--gpu_id", "cpu", "--training_type", "ce", "--teacher", "res8", "--path_to_save", out,
                          *extra])


def test_an_image_folder_is_cached_in_cache_dir_and_the_path_printed(image_folder, tmp_path, capsys):
    before = files(image_folder)
    assert image_run(image_folder, tmp_path / "a.pth", "--cache_dir", tmp_path / "cache") == 0
    cached, = (tmp_path / "cache").iterdir()
    assert cached.suffix == ".npz" and cached.name.startswith("images-")
    assert f"Cached the decoded images in {cached} ({cached.stat().st_size / 1e6:.1f} MB)." in capsys.readouterr().out
    assert files(image_folder) == before  # nothing written beside the images
    assert files(tmp_path / "home_cache") == {}


def test_no_cache_writes_no_cache_anywhere(image_folder, tmp_path, capsys):
    before = files(image_folder)
    assert image_run(image_folder, tmp_path / "a.pth", "--cache_dir", tmp_path / "cache", "--no_cache") == 0
    assert image_run(image_folder, tmp_path / "b.pth", "--no_cache") == 0
    assert "Cached" not in capsys.readouterr().out
    assert files(image_folder) == before
    assert not (tmp_path / "cache").exists() and files(tmp_path / "home_cache") == {}


def rerun_env(tmp_path) -> dict:
    """The environment of a shell whose ``python3`` is this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A wrapper, not a link: a virtual environment's interpreter finds its packages from its own path.
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def assert_same_training(original: dict, again: dict) -> None:
    """The two records trained alike, epoch by epoch."""
    for a, b in zip(original["history"], again["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert (b["train_top1"], b["test"]) == (a["train_top1"], a["test"])


def test_a_result_file_records_the_command_that_reruns_it(tmp_path):
    first = tmp_path / "runs" / "m.pth"
    assert run_inprocess([*SHORT, "--path_to_save", first]) == 0
    record = read(first.with_suffix(".json"))
    assert record["cwd"] == os.getcwd()
    assert record["command"].startswith("python3 ") and record["command"].endswith(f"--path_to_save {first}")
    # From the record alone, in a shell started elsewhere: its directory, its command, another output.
    again = tmp_path / "again.pth"
    line = (f'cd {shlex.quote(record["cwd"])} && eval "$({shlex.quote(sys.executable)} -c '
            f'\'import json, sys; print(json.load(open(sys.argv[1]))["command"])\' {first.with_suffix(".json")})" '
            f'--path_to_save {again}')
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=rerun_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rerun = read(again.with_suffix(".json"))
    assert_same_training(record, rerun)
    assert rerun["command"] == f"{record['command']} --path_to_save {again}"


@pytest.mark.skipif(shutil.which("jq") is None, reason="the documented line uses jq")
def test_the_documented_rerun_line_works(tmp_path):
    docs = (ROOT / "docs" / "PIPELINES.md").read_text()
    line = next(l.strip() for l in docs.splitlines() if l.strip().startswith('eval "cd $(jq'))
    first = tmp_path / "runs" / "kd.pth"
    assert run_inprocess([*SHORT, "--path_to_save", first]) == 0
    line = line.replace("runs/kd.json", str(first.with_suffix(".json"))).replace("runs/kd_again.pth",
                                                                                   str(tmp_path / "again.pth"))
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=rerun_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_training(read(first.with_suffix(".json")), read(tmp_path / "again.json"))


def test_head_tuning_explains_its_large_loss_before_training(tmp_path, capsys):
    teacher = tmp_path / "teacher.pth"
    assert run_inprocess([*SHORT, "--path_to_save", teacher]) == 0
    assert run_inprocess([*SHORT, "--training_type", "fine_tune", "--saved_path", teacher,
                          "--path_to_save", tmp_path / "heads"]) == 0
    out = capsys.readouterr().out
    # res8 at 32x32: the first head flattens 16 channels of 32x32 (16,384 features) into 10 classes.
    line = next(l for l in out.splitlines() if l.startswith("[fine_tune] 3 heads on res8: 163,850, "))
    assert "sum of the 3 heads' cross-entropies" in line and "up to 16,384 features" in line
    assert "docs/METHODS.md#head-fine-tuning" in line
    assert out.index(line) < out.index("[fine_tune] epoch 1/1")
