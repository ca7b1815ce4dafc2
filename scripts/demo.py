"""The end-to-end demo on generated data: one pipeline command trains a res20 teacher, tunes its three heads,
and trains the res8 student alone (CE), with KD and with DIH over two seeds; then the report's table, and
the last training losses of every run to show how each ended.

    python3 scripts/demo.py [--readme]

The data is 2,000 images of the generated ``synthetic`` dataset. Every student run has the same budget,
6 epochs of the method's recipe (SGD, lr 0.1, MultiStepLR at 30%, 60% and 90% of the epochs, batch 64,
T = 5, alpha = 0.1), nothing tuned per method; the teacher, as a trained teacher would be, has more:
10 epochs of the same recipe. Outputs go to ``demo_runs/`` (``--overwrite`` makes the demo repeatable).

The demo fixes PyTorch's thread count (``THREADS``) whatever ``OMP_NUM_THREADS`` says: the numbers differ
with it. ``--readme`` then writes the figures to ``docs/demo.json`` and rewrites the README's demo section
from them (``demo_readme``), so the README shows what the demo printed.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataload  # noqa: E402
import final_test  # noqa: E402
import report  # noqa: E402
from dihkit.files.atomic_files import atomic_write_text  # noqa: E402
from dihkit.foundations.errors import UserError  # noqa: E402
from demo_readme import FIGURES, README, render, write_section  # noqa: E402

OUT = Path("demo_runs")
THREADS = 1
COMMAND = ["--training_type", "pipeline", "--methods", "ce", "kd", "dih", "--seed", "30", "50",
           "--teacher", "res20", "--student", "res8", "--dataset", "synthetic", "--train_subset", "2000",
           "--epochs", "6", "--teacher_epochs", "10",
           "--path_to_save", str(OUT), "--overwrite"]
LAST_EPOCHS = 3


def last_losses(folder: Path) -> dict:
    """Each run's training loss over its last epochs, by result file: a settled run changes little there."""
    losses = {}
    for result in sorted(folder.glob("*.json")) + sorted(folder.glob("*/result.json")):
        record = json.loads(result.read_text())
        if "history" in record:
            losses[str(result.relative_to(folder))] = [e["train_loss"] for e in record["history"][-LAST_EPOCHS:]]
    return losses


def table(folder: Path) -> dict:
    """The report's one column: its title and each row's label, kind and last-epoch test top-1 per run."""
    found = report.build_table([folder])
    pair, = found.pairs
    return {"column": pair.title(), "classes": len(dataload.known_info(pair.dataset).classes),
            "rows": [{"label": row.label, "kind": row.kind, "values": found.cells[(row, pair)].values("last")}
                     for row in found.rows() if (row, pair) in found.cells]}


def figures(folder: Path, seconds: float, load: list) -> dict:
    """What the README's demo section is written from: the command, threads, machine, time, table, losses."""
    return {"command": "python3 final_test.py " + " ".join(COMMAND), "threads": THREADS,
            "cores": os.cpu_count(), "load": [round(x, 1) for x in load], "seconds": round(seconds),
            **table(folder), "losses": last_losses(folder)}


def main(argv=None) -> int:
    """Run the pipeline on ``THREADS`` threads, show how every run ended and the wall time; with
    ``--readme`` also rewrite the README's demo section from what it printed."""
    p = argparse.ArgumentParser(description="The end-to-end demo on generated data (a few CPU minutes).")
    p.add_argument("--readme", action="store_true",
                   help=f"write the figures to {FIGURES} and rewrite the demo section of {README}")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    start, load = time.time(), [os.getloadavg()[0]]
    code = final_test.main(COMMAND)
    if code:
        return code
    load.append(os.getloadavg()[0])
    result = figures(OUT, time.time() - start, sorted(load))
    print(f"\ntraining loss, last {LAST_EPOCHS} epochs")
    for name, losses in result["losses"].items():
        print(f"  {name}: " + " ".join(f"{x:.3f}" for x in losses))
    print(f"\ndemo: {result['seconds']} s on {THREADS} thread(s)")
    if args.readme:
        try:
            write_section(README, render(result))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        atomic_write_text(FIGURES, json.dumps(result, indent=1) + "\n")
        print(f"wrote {FIGURES} and the demo section of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
