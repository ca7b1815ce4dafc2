"""Measure the distillation tests' margins (tests/test_distillation.py): per case and seed, the method's distance
from its teacher, its twin's, their ratio against the limit ``1 - margin``, and the negative control's ratio
(control / twin); then the heads checks (the method's distance from the teacher's heads, its comparator's,
their ratio, and the ratio of the control, the method with the teacher in its heads' place).

    python3 tests/measure_distillation.py --seeds 7 8 9 [--cases kd dih ...]

Not a test (pytest collects test_*.py only); it trains every run the tests train, on one thread: 842 s for seeds
7 to 10 on a 2-core CPU at load average 8. Rerun it after a change to a method or to the world, and set each
margin to half the smallest gap (``1 - ratio``) it prints over seeds 7, 8 and 9.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (the suite's environment: the repository importable, no native bfloat16)

import torch  # noqa: E402

from console import data_loaded_once  # noqa: E402
from distillation_lab import CASES, HEADS_CHECKS, SEEDS, Lab, World, distils, make_noisy_world  # noqa: E402


def case_row(lab: Lab, name: str) -> str:
    """One case at one seed: distances, ratio, limit, the control's ratio, and whether the checks hold."""
    method, twin, control = (lab.distance(name, v) for v in ("method", "twin", "control"))
    margin = CASES[name].margin
    ok = distils(method, twin, margin) and not distils(control, twin, margin)
    return (f"{name:40s} {lab.seed:4d} {method:9.4f} {twin:9.4f} {method / twin:7.3f} {1 - margin:7.3f} "
            f"{control / twin:9.3f}  {'ok' if ok else 'FAILS'}")


def heads_row(lab: Lab, name: str) -> str:
    """One heads check at one seed: the method against its comparator, and the control against the comparator."""
    check = HEADS_CHECKS[name]
    method, other, control = (lab.heads_distance(name, v) for v in ("method", check.comparator, check.control))
    ok = distils(method, other, check.margin) and not distils(control, other, check.margin)
    return (f"{'heads: ' + name:40s} {lab.seed:4d} {method:9.4f} {other:9.4f} {method / other:7.3f} "
            f"{1 - check.margin:7.3f} {control / other:9.3f}  {'ok' if ok else 'FAILS'}")


def main(argv=None) -> int:
    """Train the world once, then every case's runs at every seed; print one line per case and seed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES), metavar="CASE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start, table = time.time(), sys.stdout
    print(f"{'case':40s} {'seed':>4s} {'method':>9s} {'twin':>9s} {'ratio':>7s} {'limit':>7s} {'control':>9s}")
    # The runs' own output (progress, epoch lines) would bury the table.
    with (tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet),
          contextlib.redirect_stderr(quiet)):
        world = World(make_noisy_world(Path(tmp) / "world"))
        with data_loaded_once(20):
            for seed in args.seeds:
                lab = Lab(world, Path(tmp) / f"seed_{seed}", seed)
                for name in args.cases:
                    print(case_row(lab, name), file=table, flush=True)
                for name in HEADS_CHECKS:
                    if name in args.cases:
                        print(heads_row(lab, name), file=table, flush=True)
    print(f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
