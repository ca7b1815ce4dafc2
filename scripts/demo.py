"""The end-to-end demo on generated data: teacher, heads, KD student and DIH student, then a table.

Runs the same four commands a researcher types (see README) at a size a laptop CPU finishes in a few
minutes, writing into ``demo_runs/`` (``--overwrite`` makes it repeatable).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import final_test  # noqa: E402
from train_funcs import RunPaths  # noqa: E402

OUT = Path("demo_runs")
COMMON = ["--dataset", "synthetic", "--val_size", "500", "--epochs", "6", "--schedule", "3", "5", "--seed", "30",
          "--batch_size", "64", "--teacher", "res20", "--student", "res8", "--overwrite"]
STEPS = [
    ("teacher res20 (CE)", ["--training_type", "ce", "--path_to_save", OUT / "teacher.pth"]),
    ("heads (fine_tune)", ["--training_type", "fine_tune", "--saved_path", OUT / "teacher.pth",
                           "--path_to_save", OUT / "heads"]),
    ("student res8 (CE)", ["--training_type", "ce", "--teacher", "res8", "--path_to_save", OUT / "student_ce.pth"]),
    ("student res8 (KD)", ["--training_type", "kd", "--saved_path", OUT / "teacher.pth",
                           "--path_to_save", OUT / "student_kd.pth"]),
    ("student res8 (DIH)", ["--training_type", "dih", "--saved_path", OUT / "teacher.pth",
                            "--saved_intermediates_directory", OUT / "heads", "--path_to_save", OUT / "student_dih.pth"]),
]


def main() -> int:
    """Run every step, stop at the first failure, and print each model's test accuracy."""
    rows = []
    for name, args in STEPS:
        print(f"== {name}", flush=True)
        code = final_test.main([str(a) for a in COMMON + args])
        if code:
            return code
        out = Path(args[args.index("--path_to_save") + 1])
        record = json.loads(RunPaths.for_output(out, is_dir=out.suffix == "").result.read_text())
        best = record["best_val"]["test"] if record["best_val"] else {}
        for output, metrics in record["final_test"].items():
            label = name if len(record["final_test"]) == 1 else f"  {output}"
            rows.append((label, metrics["top1"], best.get(output, {}).get("top1", float("nan"))))
    print(f"\n{'model':<22} {'test top-1, last epoch':>23} {'test top-1, best val':>21}")
    for label, last, best in rows:
        print(f"{label:<22} {last:>23.2f} {best:>21.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
