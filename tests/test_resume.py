"""Killed runs resume to the bit: SIGKILL after epoch 1 of 3, then --resume, equals the uninterrupted run.

Each killed run is a real process (started together, in the background, while the uninterrupted
references train in this process); the resumed runs go through the console in-process. Also here: a
SIGTERM mid-epoch, a two-stage method killed in its second stage, and refused resumes.
"""
import json
import re
import shutil
import signal
import threading

import pytest
import torch

import dataload
import train_funcs
from dihkit.files.checkpoints import atomic_save
from dihkit.foundations.errors import UserError
from dihkit.runs.run_state import check_resume_args
from dihkit.foundations.registry import REGISTRY
from console import run_inprocess
from faults import kill_after_first_epoch, make_imagefolder, recipe, signalled_run

# The feature baseline tested: CRD when registered (it is, at the time of writing), else AT or FitNets.
FEATURE = next(t for t in ("crd", "at", "fitnets") if t in REGISTRY)
TYPES = ["ce", "fine_tune", "kd", "dih", FEATURE]


def outputs(kind: str, folder):
    """Where a run of ``kind`` writes: its final output (a folder for fine_tune) and its checkpoint."""
    if kind == "fine_tune":
        return folder / "heads", folder / "heads" / "state.pth"
    return folder / "m.pth", folder / "m.state.pth"


def command(kind: str, base, folder) -> list:
    """The console arguments of a three-epoch run of ``kind`` writing into ``folder``."""
    extra = {"ce": [], "fine_tune": ["--saved_path", base / "teacher.pth"],
             "kd": ["--saved_path", base / "teacher.pth"],
             "dih": ["--saved_path", base / "teacher.pth", "--saved_intermediates_directory", base / "heads"]}
    flags = extra.get(kind, ["--saved_path", base / "teacher.pth"])
    return [*recipe(base / "data"), "--training_type", kind, *flags, "--path_to_save", outputs(kind, folder)[0]]


def fitnets_command(base, folder) -> list:
    """FitNets with one stage-1 epoch and three stage-2 epochs."""
    return [*recipe(base / "data"), "--training_type", "fitnets", "--saved_path", base / "teacher.pth",
            "--epochs_fitnets_1", "1", "--path_to_save", folder / "m.pth"]


def sigterm_command(base, folder) -> list:
    """Plain CE with ten batches an epoch, so a signal lands well inside an epoch."""
    return [*recipe(base / "data", epochs=2), "--training_type", "ce", "--batch_size", "10",
            "--path_to_save", folder / "m.pth"]


def in_background(target, *args) -> dict:
    """Run ``target(*args)`` in a thread; the returned dict gets its ``result`` or ``error``."""
    box = {}

    def work():
        try:
            box["result"] = target(*args)
        except BaseException as e:  # reported by the test that reads the box
            box["error"] = e

    box["thread"] = threading.Thread(target=work, daemon=True)
    box["thread"].start()
    return box


def collect(box: dict):
    """The background job's result (re-raising its error)."""
    box["thread"].join()
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Teacher and heads; every killed run, started at once in the background; the references in-process."""
    base = tmp_path_factory.mktemp("resume")
    make_imagefolder(base / "data")
    one_epoch = recipe(base / "data", epochs=1)
    assert run_inprocess([*one_epoch, "--training_type", "ce", "--path_to_save", base / "teacher.pth"]) == 0
    assert run_inprocess([*one_epoch, "--training_type", "fine_tune", "--saved_path", base / "teacher.pth",
                          "--path_to_save", base / "heads"]) == 0
    jobs = {}
    for kind in TYPES:
        (base / "run" / kind).mkdir(parents=True)
        jobs[kind] = in_background(kill_after_first_epoch, command(kind, base, base / "run" / kind), base,
                                   outputs(kind, base / "run" / kind)[1])
    (base / "run" / "fitnets").mkdir()
    jobs["fitnets"] = in_background(kill_after_first_epoch, fitnets_command(base, base / "run" / "fitnets"), base,
                                    base / "run" / "fitnets" / "m_final.state.pth")
    (base / "run" / "sigterm").mkdir()
    # A real SIGTERM as the 14th batch starts (epoch 2, batch 4): between batches, where the run ends the batch.
    jobs["sigterm"] = in_background(signalled_run, sigterm_command(base, base / "run" / "sigterm"),
                                    "train_funcs:Trainer.step", 14, base)
    for kind in TYPES:
        assert run_inprocess(command(kind, base, base / "ref" / kind)) == 0, kind
    # A copy of kd's killed run, for the test that alters its checkpoint (the other resumes it in place).
    collect(jobs["kd"])
    shutil.copytree(base / "run" / "kd", base / "altered")
    assert run_inprocess(fitnets_command(base, base / "ref" / "fitnets")) == 0
    assert run_inprocess(sigterm_command(base, base / "ref" / "sigterm")) == 0
    return base, {name: collect(job) for name, job in jobs.items()}


def tensors(path) -> dict:
    """Every tensor of a saved model or head file, by its key path (weights, buffers, extra modules)."""
    out = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)

    walk("", torch.load(path, weights_only=True))
    return out


def assert_bit_identical(a, b):
    """Two model files (or two heads folders) hold exactly the same tensors."""
    files = sorted(p.name for p in a.glob("head_*.pth")) if a.is_dir() else [None]
    assert files, f"no heads in {a}"
    for name in files:
        ta, tb = (tensors(x / name if name else x) for x in (a, b))
        assert ta.keys() == tb.keys() and len(ta) > 0
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name or a.name}: {key} differs after resuming"


def history(result_file) -> list:
    """The per-epoch record without its timings."""
    record = json.loads(result_file.read_text())
    return [{k: v for k, v in e.items() if k != "epoch_time_s"} for e in record["history"]], record


@pytest.mark.parametrize("kind", TYPES)
def test_killed_run_resumes_bit_identical(world, kind, capsys):
    base, killed = world
    state = killed[kind]
    assert state["epoch"] == 1 and state["batch"] == 0, "killed after epoch 1"
    assert {"method", "optimizer", "scheduler", "rng", "best_val", "history", "args", "seed"} <= set(state)
    assert len(state["history"]) == 1 and state["best_val"]["epoch"] == 1
    final, _ = outputs(kind, base / "run" / kind)
    assert not (final.is_file() or (final / "head_1.pth").exists())
    capsys.readouterr()
    assert run_inprocess([*command(kind, base, base / "run" / kind), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    reference, _ = outputs(kind, base / "ref" / kind)
    assert_bit_identical(reference, final)
    result = (final / "result.json") if kind == "fine_tune" else final.with_suffix(".json")
    ref_result = (reference / "result.json") if kind == "fine_tune" else reference.with_suffix(".json")
    (got, record), (want, ref_record) = history(result), history(ref_result)
    assert got == want and len(got) == 3
    assert record["best_val"] == ref_record["best_val"] and record["complete"]
    assert not outputs(kind, base / "run" / kind)[1].exists(), "the checkpoint is removed once the run is complete"


def test_two_stage_method_resumes_in_its_second_stage(world, capsys):
    base, killed = world
    folder = base / "run" / "fitnets"
    assert killed["fitnets"]["phase"] == "fitnets_2" and killed["fitnets"]["epoch"] == 1
    stage1 = (folder / "m.pth").read_bytes()
    capsys.readouterr()
    assert run_inprocess([*fitnets_command(base, folder), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "[fitnets_1] already complete" in out and "[fitnets_2] resuming" in out
    assert (folder / "m.pth").read_bytes() == stage1, "the finished stage is not trained again"
    assert_bit_identical(base / "ref" / "fitnets" / "m_final.pth", folder / "m_final.pth")


def test_sigterm_mid_epoch_stops_cleanly_and_resumes(world, capsys):
    base, killed = world
    code, _, err = killed["sigterm"]
    folder = base / "run" / "sigterm"
    assert code == 128 + signal.SIGTERM
    assert "stopped by signal 15 in epoch 2 after batch 4" in err and "--resume" in err and "Traceback" not in err
    state = torch.load(folder / "m.state.pth", weights_only=True)
    assert state["epoch"] == 1 and state["batch"] == 4, "stopped inside epoch 2, after the batch it was in"
    assert run_inprocess([*sigterm_command(base, folder), "--resume"]) == 0
    # Mid-epoch resumption replays the epoch's draws and skips the batches done: bit-identical as well.
    assert_bit_identical(base / "ref" / "sigterm" / "m.pth", folder / "m.pth")
    assert history(folder / "m.json")[0] == history(base / "ref" / "sigterm" / "m.json")[0]


def test_finished_run_is_skipped_on_resume_and_its_arguments_checked(world, capsys):
    base, _ = world
    folder = base / "ref" / "kd"
    before = (folder / "m.pth").read_bytes()
    capsys.readouterr()
    assert run_inprocess([*command("kd", base, folder), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (folder / "m.pth").read_bytes() == before
    assert run_inprocess([*command("kd", base, folder), "--resume", "--kd_alpha", "0.5"]) == 2
    assert "--kd_alpha was 0.1" in capsys.readouterr().err


def test_resume_follows_the_checkpoint_and_trains_only_the_epochs_left(world, monkeypatch):
    """A restart from scratch is bit-identical to a resume (both deterministic), so this test changes what only
    the checkpoint carries, the data generator's state, and shows the resumed run draws its batches from the
    altered state; it also counts the batches the resumed process trains: two epochs of three."""
    base, _ = world
    folder = base / "altered"
    state = torch.load(folder / "m.state.pth", weights_only=True)
    original = state["rng"][0]["data"]
    state["rng"][0]["data"] = torch.Generator().manual_seed(12345).get_state()
    atomic_save(state, folder / "m.state.pth")
    trained, real_step = [], train_funcs.Trainer.step

    def step(trainer, x, y, idx, b, *rest):
        trained.append((trainer.ctx, b, idx.clone()))
        return real_step(trainer, x, y, idx, b, *rest)

    monkeypatch.setattr(train_funcs.Trainer, "step", step)
    assert run_inprocess([*command("kd", base, folder), "--resume"]) == 0
    ctx = trained[0][0]

    def first_batch(generator_state):
        """The sample indices of the first batch an epoch draws from a data generator in this state."""
        generator = torch.Generator()
        generator.set_state(generator_state)
        batches = dataload.train_batches(ctx.data.train, ctx.info, ctx.cfg.data.batch_size, "cpu", generator,
                                         ctx.cfg.data.data_path, 0)
        return next(iter(batches))[2]

    per_epoch = train_funcs.num_train_batches(len(ctx.data.train), ctx.cfg.data.batch_size, 1)
    assert per_epoch > 1 and len(trained) == 2 * per_epoch, "the resumed process trains epochs 2 and 3 only"
    assert [b for _, b, _ in trained] == [*range(per_epoch)] * 2
    assert torch.equal(trained[0][2], first_batch(state["rng"][0]["data"])), "epoch 2 follows the altered state"
    assert not torch.equal(trained[0][2], first_batch(original)), "the altered state draws other batches"


def test_a_resume_may_change_only_what_changes_no_number(tmp_path):
    """The flags of MAY_CHANGE_ON_RESUME (and trained inputs, compared by weights) may change; every other one
    is refused naming it and both values, the numerics included; a legacy ``auto`` is not compared."""
    flags = {"precision": "fp32", "memory_format": "contiguous", "compile": False, "nan_policy": "stop",
             "deterministic": True, "data_path": "device", "lr": 0.1, "num_workers": 0, "gpu_id": None,
             "saved_path": "a.pth", "recipe": ["dih"], "data_dir": "data", "explicit_flags": ["lr"]}
    state = {"args": dict(flags), "seed": 3, "cohort": "c", "data": "d"}

    def check(recorded=state, **changed):
        check_resume_args(recorded, {**flags, **changed}, 3, "c", "d", tmp_path / "m.state.pth")

    check(num_workers=4, gpu_id="cuda:1", saved_path="b.pth", recipe=["crd"], data_dir="moved", explicit_flags=[])
    for flag, value in (("precision", "bf16"), ("memory_format", "channels_last"), ("compile", True),
                        ("nan_policy", "skip"), ("deterministic", False), ("data_path", "loader"), ("lr", 0.2)):
        with pytest.raises(UserError, match=re.escape(f"--{flag} was {flags[flag]!r} in the earlier run but is "
                                                      f"{value!r} now")):
            check(**{flag: value})
    check({**state, "args": {**flags, "precision": "auto"}}, precision="bf16")
