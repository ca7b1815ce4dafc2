"""Wall time of one multi-seed command: seeds one after the other against ``--concurrent_seeds``.

    python3 bench/seed_sweep.py --device cuda:0 --training_type ce --seeds 30 50 67 --epochs 1 \
        --out bench/results/seed_sweep.json

Both commands are the console's own on generated data of the chosen shape; the ratio is measured in one
run on one machine. Extra console flags can follow ``--``.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dihkit.files.atomic_files import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The sweep benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="the console's --gpu_id")
    p.add_argument("--training_type", default="ce", help="a training type that needs no trained inputs")
    p.add_argument("--model", default="res8", help="the model trained (--teacher for ce)")
    p.add_argument("--seeds", type=int, nargs="+", default=[30, 50, 67])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train_subset", type=int, default=2000, help="generated training images per run")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("extra", nargs="*", help="further console flags (after --)")
    return p.parse_args(argv)


def timed(command: list, cwd: Path) -> float:
    """Seconds one console command takes; a failure stops the benchmark with its output."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    """Time both orders and print the ratio."""
    opts = parse_args(argv)
    base = [sys.executable, str(ROOT / "final_test.py"), "--training_type", opts.training_type, "--teacher",
            opts.model, "--dataset", "synthetic", "--train_subset", str(opts.train_subset), "--epochs",
            str(opts.epochs), "--gpu_id", opts.device, "--seed", *map(str, opts.seeds), *opts.extra]
    with tempfile.TemporaryDirectory() as tmp:
        one_seed = timed([*base[:base.index("--seed") + 1], str(opts.seeds[0]), *opts.extra,
                          "--path_to_save", f"{tmp}/one.pth"], Path(tmp))
        sequential = timed([*base, "--path_to_save", f"{tmp}/seq.pth"], Path(tmp))
        concurrent = timed([*base, "--path_to_save", f"{tmp}/par.pth", "--concurrent_seeds", str(len(opts.seeds))],
                           Path(tmp))
    result = {"settings": vars(opts), "one_seed_s": one_seed, "sequential_s": sequential, "concurrent_s": concurrent,
              "concurrent_to_one_seed": concurrent / one_seed, "sequential_to_concurrent": sequential / concurrent,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    if opts.out:
        atomic_write_text(opts.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
