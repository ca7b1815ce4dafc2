"""--concurrent_seeds: the seeds of one command, or the steps of a pipeline, as processes at once give the runs one
after the other."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from console import ROOT, TINY
from dihkit.console.seed_runs import seed_outputs


def console(args, cwd):
    """The console in a fresh process, one CPU thread per process so both orders compute alike."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "final_test.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_concurrent_seeds_equal_the_sequential_runs(tmp_path):
    base = [*TINY, "--training_type", "ce", "--teacher", "res8", "--train_subset", "100", "--seed", "3", "4"]
    one_by_one = console([*base, "--path_to_save", tmp_path / "seq" / "m.pth"], tmp_path)
    together = console([*base, "--path_to_save", tmp_path / "par" / "m.pth", "--concurrent_seeds", "2"], tmp_path)
    assert one_by_one.returncode == 0 and together.returncode == 0, together.stderr[-2000:]
    assert "test top-1 over 2 seeds" in together.stdout and "seed 4: done" in together.stdout
    for seed in (3, 4):
        name = f"m_s{seed}"
        assert (tmp_path / "par" / f"{name}.log").is_file()
        seq, par = weights(tmp_path / "seq" / f"{name}.pth"), weights(tmp_path / "par" / f"{name}.pth")
        assert all(torch.equal(seq[k], par[k]) for k in seq), f"seed {seed} differs"
        record = json.loads((tmp_path / "par" / f"{name}.json").read_text())
        assert record["seed"] == seed and record["complete"]


def test_concurrent_seeds_refuses_existing_outputs_before_starting(tmp_path):
    (tmp_path / "m_s4.pth").write_bytes(b"a finished model")
    done = console([*TINY, "--training_type", "ce", "--seed", "3", "4", "--concurrent_seeds", "2",
                    "--path_to_save", tmp_path / "m.pth"], tmp_path)
    assert done.returncode == 2 and "already exists" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_s4.pth"]


def test_a_heads_folder_with_a_dot_keeps_its_name_per_seed():
    assert seed_outputs(Path("runs/heads_lr0.1"), [30, 50], is_dir=True) == [
        (30, Path("runs/heads_lr0.1_s30")), (50, Path("runs/heads_lr0.1_s50"))]
    assert seed_outputs(Path("runs/kd.pth"), [30, 50]) == [(30, Path("runs/kd_s30.pth")), (50, Path("runs/kd_s50.pth"))]


def weights_under(root):
    """Every model file under ``root`` by its relative path, as its state dict."""
    return {p.relative_to(root).as_posix(): weights(p) for p in root.rglob("*.pth")}


@pytest.mark.slow
def test_a_pipeline_in_two_workers_trains_what_one_process_trains(tmp_path):
    base = [*TINY, "--training_type", "pipeline", "--methods", "ce", "kd", "dih", "--seed", "3", "4",
            "--train_subset", "100", "--teacher_train_subset", "200"]
    one = console([*base, "--path_to_save", tmp_path / "one"], tmp_path)
    two = console([*base, "--path_to_save", tmp_path / "two", "--concurrent_seeds", "2"], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    seq, par = weights_under(tmp_path / "one"), weights_under(tmp_path / "two")
    assert sorted(seq) == sorted(par) == sorted(["teacher.pth", "heads/head_1.pth", "heads/head_2.pth",
                                                 "heads/head_3.pth"] + [f"{m}_s{s}.pth" for m in ("ce", "kd", "dih")
                                                                        for s in (3, 4)])
    for name in seq:
        assert all(torch.equal(seq[name][k], par[name][k]) for k in seq[name]), f"{name} differs"
    # The student trained alone needs no teacher: it starts beside the teacher, before the teacher is done.
    events = [line.split(" (output in")[0].split(": python3")[0] for line in two.stdout.splitlines()
              if line.startswith("== [")]
    assert events.index("== [3/8] ce seed 3") < events.index("== [1/8] teacher res14: done") < events.index(
        "== [2/8] heads") < events.index("== [2/8] heads: done") < events.index("== [5/8] dih seed 3")
    assert (tmp_path / "two" / "heads.log").is_file() and (tmp_path / "two" / "kd_s4.log").is_file()
    manifest = json.loads((tmp_path / "two" / "pipeline.json").read_text())
    assert [s["status"] for s in manifest["steps"]] == ["complete"] * 8
    # The teacher trained on its own subset, every other step on --train_subset.
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "two").rglob("*.json")
               if p.name != "pipeline.json"}
    assert {name: r["args"]["train_subset"] for name, r in records.items()} == {
        "teacher.json": 200, "result.json": 100, **{f"{m}_s{s}.json": 100 for m in ("ce", "kd", "dih") for s in (3, 4)}}


@pytest.mark.slow
def test_a_refused_step_in_a_worker_ends_the_pipeline_with_one_sentence(tmp_path):
    done = console([*TINY, "--training_type", "pipeline", "--methods", "ce", "takd", "--ta", "res110", "--seed", "3",
                    "--train_subset", "100", "--concurrent_seeds", "2", "--path_to_save", tmp_path / "p"], tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "step 'takd seed 3' ended with exit code 2; its output is in" in done.stderr
    assert "takd_s3.log" in done.stderr and "Traceback" not in done.stderr
    assert "error:" in (tmp_path / "p" / "takd_s3.log").read_text()
    assert json.loads((tmp_path / "p" / "ce_s3.json").read_text())["complete"]  # the finished steps are kept
