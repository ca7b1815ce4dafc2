"""The end-to-end demo: one pipeline command trains a teacher, tunes its three heads, and trains a student alone
(CE), with KD and with DIH over three seeds, in a setting where the teacher knows what the students' data hides:
the teacher learns from clean labels, each student from a subset with 40% of its labels wrong. Then the report's
table, the wall and CPU time, and the machine's load.

    python3 scripts/demo.py [--readme]                      generated data, float32 on the CPU (~3 minutes, 2 cores)
    python3 scripts/demo.py --dataset cifar10 [--readme]    real CIFAR-10 through torchvision (downloaded into ./data)
    python3 scripts/demo.py --data_dir DIR [--readme]       real CIFAR-10 JPEGs in DIR/train/<class>/ (a test split
                                                            of 500 images per class is held out first)

Every step follows the method's recipe (SGD, lr 0.1, MultiStepLR at 30/60/90% of the epochs, batch 64, T = 5,
alpha = 0.1) at a small budget, nothing tuned per method. Two worker processes train the steps
(``--concurrent_seeds 2``); a step computes exactly as it would alone. The generated demo pins what changes its
numbers besides the seeds (``PINNED``: one thread per process, x86 kernels no wider than AVX2, float32,
contiguous memory), so every x86 CPU with AVX2 should print its table; the real-data demo takes the machine's own
defaults (bfloat16 on a CPU with AMX-BF16, the GPU when there is one) and its table is that machine's.

``--readme`` copies the result files the figures come from to ``docs/demo/<variant>/``, writes the figures with
those files' sha256 digests to ``docs/demo/<variant>.json``, and rewrites the demo sections of README.md and
docs/DEMO.md from them (``demo_readme``); tests/test_first_hour.py checks the digests and that the figures
recompute from the files.
"""
import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import final_test  # noqa: E402
import report  # noqa: E402
from dihkit.files.atomic_files import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from dihkit.foundations.errors import UserError  # noqa: E402
from demo_readme import DOCS, ROOT, timing_words, write_sections  # noqa: E402
from split_imagefolder import default_test_per_class, write_split  # noqa: E402

# What changes the generated demo's numbers besides the seeds, set for its worker processes before they load
# torch: the intra-op threads, and the widest x86 kernels oneDNN, ATen and MKL may use (a CPU with AVX-512 or
# AMX then computes as one with AVX2 does). Precision and memory format are the command's flags.
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
          "MKL_CBWR": "AVX2"}
WORKERS = 2
# The setting: the teacher learns from every training image with its label; each student (and DIH's heads, tuned
# on the student's data) from a subset with 40% of the labels wrong.
SETTING = ("--methods", "ce", "kd", "dih", "--seed", "30", "50", "67", "--teacher", "res14", "--student", "res8",
           "--teacher_train_subset", "0", "--teacher_label_noise", "0", "--label_noise", "0.4",
           "--concurrent_seeds", str(WORKERS))


@dataclass(frozen=True)
class Variant:
    """One demo: its name, its data and budget flags, and the environment it pins."""
    name: str
    flags: tuple
    pinned: dict

    @property
    def out(self) -> Path:
        """The pipeline's folder."""
        return Path("demo_runs") / self.name

    def command(self, data: tuple) -> list:
        """The console command of the demo's pipeline on ``data`` (its --dataset and --data_dir)."""
        return ["--training_type", "pipeline", *SETTING, *data, *self.flags, "--path_to_save", str(self.out),
                "--overwrite"]


# A short run decays the lr once, late (after two thirds to four fifths of its epochs): the recipe's three decays
# at 30/60/90% would leave it only a few epochs of real progress.
SYNTHETIC = Variant("synthetic", ("--train_subset", "1000", "--epochs", "6", "--schedule", "4", "--teacher_epochs",
                                  "3", "--teacher_schedule", "2", "--gpu_id", "cpu", "--precision", "fp32",
                                  "--memory_format", "contiguous"), PINNED)
CIFAR10 = Variant("cifar10", ("--train_subset", "5000", "--epochs", "12", "--schedule", "9", "--teacher_epochs", "5",
                              "--teacher_schedule", "4"), {})
LAST_EPOCHS = 3
TIMING = "demo_timing.json"   # what the demo measured itself, beside the runs' result files


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
    return {"column": pair.title(),
            "rows": [{"label": row.label, "kind": row.kind, "values": found.cells[(row, pair)].values("last")}
                     for row in found.rows() if (row, pair) in found.cells]}


def digests(folder: Path) -> dict:
    """The sha256 of every JSON file under ``folder``, by its path there."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.json"))}


def figures(folder: Path) -> dict:
    """What the demo's sections are written from, computed from the files in ``folder`` alone: the demo's own
    measurements (``TIMING``), the runs' precision, the table, the last losses and every file's digest."""
    timing = json.loads((folder / TIMING).read_text())
    teacher = json.loads((folder / "teacher.json").read_text())
    return {**timing, "device": teacher["device"], "precision": teacher["precision"],
            "classes": teacher["meta"]["num_classes"], **table(folder),
            "losses": last_losses(folder), "digests": digests(folder)}


class LoadSampler(threading.Thread):
    """The machine's 1-minute load average every few seconds while the demo runs: at the start, the most, the end."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stopped = every, [os.getloadavg()[0]], threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def finish(self) -> list:
        """[start, most, end], rounded to one decimal."""
        self.stopped.set()
        self.samples.append(os.getloadavg()[0])
        return [round(x, 1) for x in (self.samples[0], max(self.samples), self.samples[-1])]


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` where there is no /proc)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def pinned(env: dict):
    """``env`` set in this process's environment (which the pipeline's workers inherit), restored after."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(variant: Variant, data: tuple) -> int:
    """Run the demo's pipeline, timing it, and write ``TIMING`` into its folder; returns the exit code."""
    argv = variant.command(data)
    env = " ".join(f"{k}={v}" for k, v in variant.pinned.items())
    command = " ".join(filter(None, [env, "python3 final_test.py", shlex.join(argv)]))
    print(f"demo: {command}", flush=True)
    shutil.rmtree(variant.out, ignore_errors=True)  # the demo's own folder: no file of an earlier run stays
    sampler, start, cpu = LoadSampler(), time.time(), cpu_seconds()
    sampler.start()
    with pinned(variant.pinned):
        code = final_test.main(argv)
    seconds, cpu, load = time.time() - start, cpu_seconds() - cpu, sampler.finish()
    if code:
        return code
    timing = {"variant": variant.name, "command": command, "workers": WORKERS, "cpu": cpu_model(),
              "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "seconds": round(seconds), "cpu_seconds": round(cpu), "load": load}
    atomic_write_json(variant.out / TIMING, timing)
    print(f"\ndemo: {timing_words(timing)}")
    return 0


def carve_test_split(source: Path, split: Path) -> Path:
    """``split/train`` and ``split/test`` linked from the class folders in ``source``, a fifth of the smallest class
    (at most 500 images) held out per class as test, as ``scripts/split_imagefolder.py`` does; kept for the next
    run when it was made from the same folder."""
    made_from = split / "source.txt"
    if made_from.is_file() and made_from.read_text().strip() == str(source.resolve()):
        return split
    files = {d.name: [f for f in d.iterdir() if f.is_file()] for d in sorted(source.iterdir()) if d.is_dir()}
    if not files:
        raise UserError(f"'{source}' has no class folders")
    shutil.rmtree(split, ignore_errors=True)
    test = default_test_per_class(min(len(f) for f in files.values()))
    write_split(files, split, test, 0, seed=0)
    atomic_write_text(made_from, f"{source.resolve()}\n")
    print(f"demo: held out {test} images per class of '{source}' as the test split in '{split}'", flush=True)
    return split


def real_data(data_dir: str | None) -> tuple:
    """The --dataset and --data_dir of the real-data demo: torchvision's CIFAR-10 (``./data`` by default), or a
    folder ``DIR/train/<class>/`` of its images (the project's JPEG tarball extracted) with a test split carved."""
    if data_dir is None:
        return ("--dataset", "cifar10")
    root = Path(data_dir)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return ("--dataset", "imagefolder", "--data_dir", str(root))
    if (root / "train").is_dir():
        return ("--dataset", "imagefolder", "--data_dir", str(carve_test_split(root / "train",
                                                                              Path("demo_runs") / "cifar10_split")))
    archives = sorted(p.name for p in root.glob("*.tar.gz")) if root.is_dir() else []
    if archives:
        raise UserError(f"'{root}' holds {archives[0]}: extract it first (mkdir -p /tmp/cifar10-jpeg && tar -xzf "
                        f"{root / archives[0]} -C /tmp/cifar10-jpeg) and pass --data_dir /tmp/cifar10-jpeg")
    return ("--dataset", "cifar10", "--data_dir", str(root))


def publish(variant: Variant) -> Path:
    """Copy the result files to ``docs/demo/<variant>/``, write the figures computed from them (with their
    digests) to ``docs/demo/<variant>.json`` and rewrite the demo's sections of README.md and docs/DEMO.md."""
    results = DOCS / "demo" / variant.name
    shutil.rmtree(results, ignore_errors=True)
    for path in variant.out.rglob("*.json"):
        atomic_write_bytes(results / path.relative_to(variant.out), path.read_bytes())
    found = figures(results)
    path = DOCS / "demo" / f"{variant.name}.json"
    atomic_write_json(path, found)
    write_sections(found)
    return path


def main(argv=None) -> int:
    """Run the generated or the real-data demo and report its time and load; with ``--readme`` publish it."""
    p = argparse.ArgumentParser(description="The end-to-end demo: teacher, heads, and CE, KD and DIH students "
                                            "over three seeds (docs/DEMO.md).")
    p.add_argument("--dataset", choices=["synthetic", "cifar10"], default=None,
                   help="synthetic: generated images, no download (default); cifar10: the real images")
    p.add_argument("--data_dir", default=None,
                   help="the real CIFAR-10: torchvision's folder (downloaded into it when missing), or a folder with "
                        "train/<class>/ image folders (a test split is held out); implies --dataset cifar10")
    p.add_argument("--readme", action="store_true",
                   help="publish the figures: docs/demo/, and the demo's sections of README.md and docs/DEMO.md")
    args = p.parse_args(argv)
    try:
        if args.dataset == "synthetic" and args.data_dir is not None:
            raise UserError("the synthetic demo generates its data: --data_dir goes with --dataset cifar10")
        real = args.dataset == "cifar10" or args.data_dir is not None
        variant = CIFAR10 if real else SYNTHETIC
        code = run(variant, real_data(args.data_dir) if real else ("--dataset", "synthetic"))
        if code == 0 and args.readme:
            print(f"wrote {publish(variant).relative_to(ROOT)} and the demo's sections of README.md and docs/DEMO.md")
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
