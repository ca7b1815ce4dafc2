"""--concurrent_seeds: the seeds of one command as processes at once give the runs one after the other."""
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
