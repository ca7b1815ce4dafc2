"""One command over several seeds: each seed's output path, the checks and the claim on all of them before
any data is read, the runs, the summary."""
import statistics
from contextlib import nullcontext
from pathlib import Path

import dataload
from dihkit.runs.distributed import Dist
from dihkit.runs.model_loading import check_inputs, trained_inputs
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunClaim, RunPaths, check_output_names
from dihkit.runs.run_state import seed_everything
from dihkit.foundations.settings import Settings


def seed_output(path: Path, seed: int, several: bool, is_dir: bool = False) -> Path:
    """The output of one seed when several run: ``runs/x.pth`` becomes ``runs/x_s30.pth``, a folder
    ``runs/heads_lr0.1`` becomes ``runs/heads_lr0.1_s30`` (a folder's name has no suffix to keep)."""
    if not several:
        return path
    if is_dir:
        return path.with_name(f"{path.name}_s{seed}")
    return path.with_name(f"{path.stem}_s{seed}{path.suffix}")


def default_output(t: TrainingType, teacher: str, student: str) -> Path:
    """Where a run writes when --path_to_save is not given: ``runs/<type>_<model>.pth`` or ``runs/<model>_heads``."""
    arch = teacher if t.trains == "teacher" else student
    return Path("runs") / (f"{arch}_heads" if t.output_is_dir else f"{t.name}_{arch}.pth")


def seed_outputs(out: Path, seeds: list, is_dir: bool = False) -> list:
    """(seed, output) of every seed of the command (``is_dir``: the outputs are folders)."""
    return [(seed, seed_output(out, seed, len(seeds) > 1, is_dir)) for seed in seeds]


def check_before_data(t: TrainingType | None, cfg: Settings, outputs: list, dist: Dist):
    """Refuse everything the flags and the input files' headers show before any data is read or anything
    written: what the training type's own check refuses (``pre_data_check``); output names that collide with
    each other or an input, or are too long; trained inputs that do not fit (``check_inputs``) or are missing;
    outputs another live run claims, or that exist. Every phase of every seed counts. Returns the claim to hold
    (``with``) from the data's loading to the run's end; the test mode (``t`` None) writes nothing and claims
    nothing.
    """
    if t is None:
        check_inputs(None, cfg)
        return nullcontext()
    if t.pre_data_check is not None:
        t.pre_data_check(cfg)
    runs = [RunPaths.for_output(path, is_dir) for _, out in outputs for path, is_dir in t.outputs(out, cfg.flags)]
    check_output_names(runs, trained_inputs(t, cfg))
    check_inputs(t, cfg)
    claim = RunClaim(runs, t.name, cfg.run.resume, cfg.run.overwrite, dist.is_main)
    claim.check()
    return claim


def run_seeds(entry, cfg: Settings, outputs: list, dist: Dist, device, data: dataload.DataBundle) -> list:
    """Run ``entry(ctx)`` once per (seed, output), every rank together under torchrun; print the summary."""
    results = []
    for seed, out in outputs:
        seed_everything(seed)
        ctx = RunContext(cfg, device, data, dist, seed, out)
        results.append(entry(ctx))
        if len(outputs) > 1:
            ctx.say(f"seed {seed}: test top-1 {results[-1]['test_top1']:.2f}%")
    if len(outputs) > 1 and dist.is_main:
        print_summary(results, [seed for seed, _ in outputs])
    return results


def print_summary(results: list, seeds: list) -> None:
    """Mean and sample standard deviation of the seeds' test top-1."""
    accs = [r["test_top1"] for r in results]
    print(f"test top-1 over {len(accs)} seeds: {statistics.mean(accs):.2f} +- {statistics.stdev(accs):.2f} "
          f"(mean +- sample std; seeds {' '.join(map(str, seeds))})")
