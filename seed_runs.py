"""One command over several seeds: each seed's output path, the claim on all of them, the runs, the summary."""
import statistics
from pathlib import Path

import dataload
from distributed import Dist
from registry import TrainingType
from run_context import RunContext
from run_outputs import RunPaths, check_claim
from run_state import seed_everything
from settings import Settings


def seed_output(path: Path, seed: int, several: bool) -> Path:
    """The output of one seed: ``runs/x.pth`` becomes ``runs/x_s30.pth`` when several seeds run."""
    if not several:
        return path
    return path.with_name(f"{path.stem}_s{seed}{path.suffix}")


def default_output(t: TrainingType, teacher: str, student: str) -> Path:
    """Where a run writes when --path_to_save is not given: ``runs/<type>_<model>.pth`` or ``runs/<model>_heads``."""
    arch = teacher if t.trains == "teacher" else student
    return Path("runs") / (f"{arch}_heads" if t.output_is_dir else f"{t.name}_{arch}.pth")


def seed_outputs(out: Path, seeds: list) -> list:
    """(seed, output) of every seed of the command."""
    return [(seed, seed_output(out, seed, len(seeds) > 1)) for seed in seeds]


def check_seed_outputs(t: TrainingType, cfg: Settings, outputs: list) -> None:
    """Refuse an existing output of any seed before the first seed trains (each type checks its other phases)."""
    for _, out in outputs:
        check_claim(RunPaths.for_output(out, is_dir=t.output_is_dir), t.name, cfg.run.resume, cfg.run.overwrite)


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
