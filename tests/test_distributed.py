"""Distributed training on the CPU: torchrun with two gloo processes, and the launch errors.

The torchrun runs chain as a user would (ce teacher -> fine_tune heads -> dih student). Each must finish,
write its outputs once, end with identical weights on both ranks (fit checks this and records the
agreed fingerprint) and report the accuracy a single process measures on the saved model.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.multiprocessing as mp

import dataload
from dihkit.runs import distributed
import final_test
from console import ROOT, TINY, run_inprocess
from dihkit.foundations.errors import UserError

# torchrun launches two processes per run: heavy, so in the full suite (--runslow) only.
pytestmark = pytest.mark.slow


# The smallest teacher keeps three launches of two processes each within this file's time budget.
SMALL_TEACHER = ["--teacher", "res8"]


def torchrun(args, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 final_test.py args`` (gloo on the CPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "final_test.py"), *map(str, TINY), *SMALL_TEACHER, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def evaluate_inprocess(monkeypatch, args) -> dict:
    """``--training_type test`` in this process, alone: the metrics the console computes."""
    seen = []
    real = final_test.evaluate_saved
    monkeypatch.setattr(final_test, "evaluate_saved", lambda ctx: seen.append(real(ctx)) or seen[-1])
    assert run_inprocess([*TINY, *SMALL_TEACHER, "--training_type", "test", *args]) == 0
    return seen[0]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run ce, fine_tune and dih under torchrun in one folder; return it and the files each run added."""
    out = tmp_path_factory.mktemp("ddp")
    commands = {
        "ce": ["--training_type", "ce", "--path_to_save", "teacher.pth"],
        "fine_tune": ["--training_type", "fine_tune", "--saved_path", "teacher.pth", "--path_to_save", "heads"],
        "dih": ["--training_type", "dih", "--saved_path", "teacher.pth", "--saved_intermediates_directory", "heads",
                "--path_to_save", "dih.pth"],
    }
    added, before = {}, set()
    for name, args in commands.items():
        proc = torchrun(args, out)
        assert proc.returncode == 0, f"{name} under torchrun failed:\n{proc.stderr[-3000:]}"
        now = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        added[name] = sorted(now - before)
        before = now
    return out, added


@pytest.mark.parametrize("name, files, result", [
    ("ce", ["teacher.json", "teacher.pth"], "teacher.json"),
    ("fine_tune", ["heads/head_1.pth", "heads/head_2.pth", "heads/head_3.pth", "heads/result.json"],
     "heads/result.json"),
    ("dih", ["dih.json", "dih.pth"], "dih.json"),
])
def test_torchrun_run_writes_once_with_identical_replicas(launched, name, files, result):
    out, added = launched
    # One model (or set of heads) and one result file: no rank-1 copies, no leftover checkpoint.
    assert added[name] == files
    record = json.loads((out / result).read_text())
    assert record["complete"] and record["world_size"] == 2
    assert len(record["replica_fingerprint"]) == 40


def test_torchrun_accuracy_matches_single_process_evaluation(launched, monkeypatch):
    out, _ = launched
    teacher = json.loads((out / "teacher.json").read_text())
    heads = json.loads((out / "heads" / "result.json").read_text())
    student = json.loads((out / "dih.json").read_text())
    alone = evaluate_inprocess(monkeypatch, ["--saved_path", out / "teacher.pth",
                                             "--saved_intermediates_directory", out / "heads"])
    assert alone["test_top1"] == teacher["test_top1"]
    for name, metrics in heads["final_test"].items():
        # The run's frozen teacher is folded (conv+BN), the test mode's is not: the mean loss agrees to
        # float rounding, the counts exactly.
        assert alone["final_test"][name] == {**metrics, "loss": pytest.approx(metrics["loss"], rel=1e-5)}
    monkeypatch.undo()
    alone = evaluate_inprocess(monkeypatch, ["--saved_path", out / "dih.pth"])
    assert alone["test_top1"] == student["test_top1"]


# ----------------------------------------------------------------------------- launch errors (no torchrun)

def free_port() -> int:
    """A TCP port nobody listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(monkeypatch, rank: int, world: int, local_world: int, port: int = 29500) -> None:
    """The variables torchrun gives a worker, without any other worker."""
    for key, value in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": rank % local_world,
                       "LOCAL_WORLD_SIZE": local_world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        monkeypatch.setenv(key, str(value))


def test_rendezvous_timeout_names_the_endpoint(monkeypatch, tmp_path, capsys):
    port = free_port()
    torchrun_env(monkeypatch, rank=1, world=2, local_world=2, port=port)
    code = run_inprocess([*TINY, "--dist_timeout", "1", "--training_type", "ce", "--path_to_save", tmp_path / "t.pth"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: rank 1 could not join") and f"127.0.0.1:{port}" in err
    assert not torch.distributed.is_initialized() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("world, extra, message", [
    (16, [], "600 training images over 16 processes leave 37 per process, fewer than one batch of 64"),
    (2, ["--sync_bn"], "--sync_bn needs CUDA"),
])
def test_world_the_run_cannot_use_is_refused_before_rendezvous(monkeypatch, tmp_path, capsys, world, extra, message):
    torchrun_env(monkeypatch, rank=0, world=world, local_world=2)
    code = run_inprocess([*TINY, *extra, "--training_type", "ce", "--path_to_save", tmp_path / "t.pth"])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("gpu_id, message", [
    ("cuda", "torchrun started 2 processes on this node but it has only 1 CUDA device(s)"),
    ("cuda:0", "would put several torchrun processes on one GPU"),
])
def test_gpus_per_node_checked(monkeypatch, tmp_path, capsys, gpu_id, message):
    torchrun_env(monkeypatch, rank=1, world=2, local_world=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if gpu_id == "cuda" else 2)
    code = run_inprocess([*TINY, "--gpu_id", gpu_id, "--training_type", "ce", "--path_to_save", tmp_path / "t.pth"])
    assert code == 2 and message in capsys.readouterr().err


def test_broken_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="RANK is not set"):
        distributed.from_env()


# ----------------------------------------------------------------------------- collectives and sharding

def _collectives_worker(rank: int, port: int, folder: str) -> None:
    """One of two gloo ranks: exercise Dist's agreement helpers and write what each returned."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    d = distributed.from_env()
    seen = {}
    with distributed.process_group(d, torch.device("cpu"), 60):
        def claim():
            if d.rank == 1:
                raise UserError("only rank 1 sees this problem")
            return "fine"
        try:
            d.check_together(claim)
        except distributed.SharedUserError as e:
            seen["shared_error"] = str(e)
        torch.manual_seed(0)
        same = nn.BatchNorm1d(3)
        seen["same"] = d.check_replicas(same)
        same.running_mean.fill_(d.rank)  # ranks' running statistics drift apart as in DDP training
        try:
            d.check_replicas(same)
        except RuntimeError:
            seen["diverged"] = True
        d.sync_buffers(same)
        seen["synced"] = same.running_mean.tolist() == [0.0, 0.0, 0.0] and d.check_replicas(same) == seen["same"]
        seen["any"], seen["all"] = d.any_true(d.rank == 1), d.all_true(d.rank == 1)
        seen["min"] = d.all_reduce_min(torch.tensor([5 - d.rank])).item()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(seen))


def test_collectives_agree_across_ranks(tmp_path):
    mp.spawn(_collectives_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["shared_error"] == "only rank 1 sees this problem"
        assert seen["diverged"] and seen["synced"]
        assert seen["any"] is True and seen["all"] is False and seen["min"] == 4


def test_ranks_share_the_order_but_not_the_augmentation():
    # Every image is the same picture, so any difference between ranks' batches is augmentation alone.
    n, world = 64, 2
    picture = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    split = dataload.Split(picture.expand(n, -1, -1, -1).contiguous(), torch.arange(n) % 10)
    info = dataload.DatasetInfo(name="same", num_classes=10, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                                classes=tuple(map(str, range(10))))
    shards = []
    for rank in range(world):
        generator = torch.Generator().manual_seed(7)
        batches = list(dataload.train_batches(split, info, 8, torch.device("cpu"), generator, "device", 0, rank, world))
        shards.append((torch.cat([x for x, _, _ in batches]), torch.cat([i for _, _, i in batches]), generator))
    (x0, i0, g0), (x1, i1, g1) = shards
    assert sorted(torch.cat([i0, i1]).tolist()) == list(range(n))  # one permutation, split between the ranks
    assert torch.equal(g0.get_state(), g1.get_state())  # the generators stay in step for the next epoch
    same = (x0 == x1).flatten(1).all(1)
    assert same.float().mean() < 0.5  # 162 crop/flip combinations: chance agreement is rare
