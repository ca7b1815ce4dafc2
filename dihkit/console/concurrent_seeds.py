"""``--concurrent_seeds N``: the seeds of one command train as N processes at once on the same device.

Small CIFAR networks leave a large GPU mostly idle; independent seeds sharing it overlap their kernels.
Each seed is the same console command with one ``--seed`` and its own output, so every check, lock and
file is the single-seed run's. Each process's output goes to ``<output>.log``.
"""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from dihkit.files.atomic_files import open_log
from dihkit.foundations.errors import UserError
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_outputs import RunPaths
from dihkit.runs.run_state import Interrupted

CONSOLE = Path(__file__).resolve().parents[2] / "final_test.py"


def child_command(argv: list, seed: int, out: Path) -> list:
    """The console command of one seed: later flags override earlier ones in argparse."""
    return [sys.executable, str(CONSOLE), *argv, "--seed", str(seed), "--path_to_save", str(out),
            "--concurrent_seeds", "1"]


def threads_per_process(workers: int) -> int:
    """The intra-op threads of each of ``workers`` processes: ``OMP_NUM_THREADS`` when the user set it (its first
    level), else the CPU's cores shared out."""
    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // workers)


def child_env(workers: int) -> dict:
    """The environment of a seed's process: the CPU threads shared out unless the user set them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(workers)))
    return env


@contextmanager
def sigterm_passed_on(pids, what: str):
    """While the block runs, a SIGTERM sent to this process alone (``kill``, ``timeout``, a scheduler) goes on to
    the processes ``pids()`` names, which stop within moments keeping their last checkpoints, and then stops this
    one; the block's exit must wait for them. A terminal's SIGINT already reaches the whole process group: passing
    it on would be each child's second signal, a stop at once."""
    def handle(signum, frame):
        for pid in pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signum)
        raise Interrupted(f"stopped by signal {signum}, passed on to {what}, which keep their last checkpoints: rerun "
                          f"the same command with --resume", signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_seed(argv: list, seed: int, out: Path, workers: int) -> subprocess.Popen:
    """Start one seed's console process, its output in ``<output>.log``."""
    with open_log(out.with_suffix(".log")) as f:
        proc = subprocess.Popen(child_command(argv, seed, out), stdout=f, stderr=subprocess.STDOUT,
                                env=child_env(workers))
    print(f"seed {seed}: started (pid {proc.pid}), output in '{out.with_suffix('.log')}'", flush=True)
    return proc


def take_ended(running: dict) -> list:
    """Remove the processes that ended from ``running`` (process -> (seed, log)), saying how each ended; return
    the failed ones' (seed, exit code, log)."""
    failed = []
    for proc in [p for p in running if p.poll() is not None]:
        seed, log = running.pop(proc)
        print(f"seed {seed}: {'done' if proc.returncode == 0 else f'failed with exit code {proc.returncode}'}",
              flush=True)
        if proc.returncode:
            failed.append((seed, proc.returncode, log))
    return failed


def run_concurrently(t: TrainingType, argv: list, outputs: list, workers: int) -> list:
    """Run each (seed, output) as its own process, ``workers`` at a time; return their result records.

    A failed seed stops nothing already running; its exit code and log are reported once all have ended.
    """
    pending, running, failed = list(outputs), {}, []
    with sigterm_passed_on(lambda: [p.pid for p in running], "the seeds' processes"):
        try:
            while pending or running:
                while pending and len(running) < workers:
                    seed, out = pending.pop(0)
                    running[start_seed(argv, seed, out, workers)] = (seed, out.with_suffix(".log"))
                time.sleep(0.2)
                failed += take_ended(running)
        finally:
            for proc in running:  # a stopped command ends after its seeds have
                proc.wait()
    if failed:
        seed, code, log = failed[0]
        raise UserError(f"{len(failed)} of {len(outputs)} seeds failed; seed {seed} ended with exit code {code}, "
                        f"its output is in '{log}'")
    results = [RunPaths.for_output(t.final_output(out), is_dir=t.output_is_dir).result for _, out in outputs]
    return [json.loads(path.read_text()) for path in results]
