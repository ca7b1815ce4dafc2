"""``--concurrent_seeds N`` in a pipeline: its steps run in N worker processes, each step as soon as the steps it
needs (the teacher, the heads) have finished; the students trained alone start beside the teacher.

A worker is a fresh Python process (spawned: a process that has used CUDA cannot fork) that runs its steps one
after the other with the console's ``run``, as the sequential pipeline does, and loads each dataset once; so
every step trains exactly as it would in one process. Each step's output goes to ``<output>.log``.
"""
import concurrent.futures as cf
import multiprocessing
import signal
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from dihkit.console.concurrent_seeds import sigterm_passed_on, threads_per_process
from dihkit.files.atomic_files import open_log
from dihkit.foundations.errors import UserError

_DATA = {}  # a worker's datasets, by their flags: loaded once, shared by its steps


def _start_worker(threads: int) -> None:
    """A worker's intra-op threads: the console's share of the CPU per process (``threads_per_process``); a
    signal outside a step's training ends it as an exit does, closing its files (a training phase handles
    signals its own way)."""
    torch.set_num_threads(threads)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)


def _exit_on_signal(signum, frame):
    """End the worker quietly: a default SIGTERM would leave its semaphores to the resource tracker's warnings,
    a default SIGINT would print a traceback."""
    sys.exit(128 + signum)


def _run_in_worker(run_step, argv: list, log: str) -> int:
    """One step in a worker, its output in ``log``: the step's exit code (2 for a refused command, 1 for a crash,
    whose traceback the log keeps)."""
    with open_log(log) as f, redirect_stdout(f), redirect_stderr(f):
        try:
            return run_step(argv, _DATA)
        except UserError as e:
            print(f"error: {e}", flush=True)
            return 2
        except Exception:
            traceback.print_exc()
            return 1


def log_of(output: Path) -> Path:
    """Where a step's output goes: ``kd_s30.pth`` -> ``kd_s30.log``, the folder ``heads`` -> ``heads.log``."""
    return output.with_name(f"{output.stem if output.suffix else output.name}.log")


def run_steps(jobs: list, run_step, workers: int, started, ended) -> None:
    """Run every job ``(step, argv)``, at most ``workers`` at once, each once ``step.after`` have all ended;
    ``started(step, log)`` and ``ended(step)`` report progress. A failed step lets the running ones end, starts
    nothing more, and is raised as one sentence naming its log."""
    pending, running, failed = list(jobs), {}, None
    context = multiprocessing.get_context("spawn")
    # Leaving the pool's block waits for its workers, a signalled one too.
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                initargs=(threads_per_process(workers),)) as pool, \
            sigterm_passed_on(lambda: [p.pid for p in multiprocessing.active_children()], "the pipeline's workers"):
        while pending or running:
            # A step waits for the steps it needs that are still to run here (a skipped one has finished before).
            waiting = {s.name for s, _ in pending} | {s.name for s, _ in running.values()}
            ready = [j for j in pending if failed is None and not set(j[0].after) & waiting]
            for step, argv in ready[:workers - len(running)]:
                pending.remove((step, argv))
                log = log_of(step.output)
                running[pool.submit(_run_in_worker, run_step, argv, str(log))] = (step, log)
                started(step, log)
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                step, log = running.pop(future)
                if future.result() == 0:
                    ended(step)
                elif failed is None:
                    failed = (step, future.result(), log)
    if failed:
        step, code, log = failed
        raise UserError(f"the pipeline's step '{step.name}' ended with exit code {code}; its output is in '{log}' "
                        f"(the steps that finished are kept: fix the command and rerun it)")
