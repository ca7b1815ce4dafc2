"""The end-to-end demo on generated data: one pipeline command trains a res20 teacher, tunes its three heads,
and trains the res8 student alone (CE), with KD and with DIH over two seeds; then the report's table, and
the last training losses of every run to show that each has settled.

The data is 2,000 images of the generated ``synthetic`` dataset. Every student run has the same budget,
6 epochs of the method's recipe (SGD, lr 0.1, MultiStepLR at 30%, 60% and 90% of the epochs, batch 64,
T = 5, alpha = 0.1), nothing tuned per method; the teacher, as a trained teacher would be, has more:
10 epochs of the same recipe. Outputs go to ``demo_runs/`` (``--overwrite`` makes the demo repeatable).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import final_test  # noqa: E402

OUT = Path("demo_runs")
COMMAND = ["--training_type", "pipeline", "--methods", "ce", "kd", "dih", "--seed", "30", "50",
           "--teacher", "res20", "--student", "res8", "--dataset", "synthetic", "--train_subset", "2000",
           "--epochs", "6", "--teacher_epochs", "10",
           "--path_to_save", str(OUT), "--overwrite"]
LAST_EPOCHS = 3


def print_last_losses(folder: Path) -> None:
    """Each run's training loss over its last epochs: a settled run changes little between them."""
    print(f"\ntraining loss, last {LAST_EPOCHS} epochs")
    for result in sorted(folder.glob("*.json")) + sorted(folder.glob("*/result.json")):
        record = json.loads(result.read_text())
        if "history" in record:
            losses = " ".join(f"{e['train_loss']:.3f}" for e in record["history"][-LAST_EPOCHS:])
            print(f"  {result.relative_to(folder)}: {losses}")


def main() -> int:
    """Run the pipeline, then show how every run ended; print the wall time."""
    start = time.time()
    code = final_test.main(COMMAND)
    if code == 0:
        print_last_losses(OUT)
    print(f"\ndemo: {time.time() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
