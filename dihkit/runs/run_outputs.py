"""The files a phase writes, and the claim a run makes on them before anything trains.

Before any data is read, a run's outputs (every phase of every seed) are refused when two of them are one
path, when one is an input or lies in an input folder, or when a name is too long for the file system
(``check_output_names``); then, holding an exclusive lock on each (``output_lock``), when they exist.
"""
import json
import os
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dih_utils import looks_like_head
from dihkit.foundations.errors import UserError
from dihkit.files.output_lock import OutputLock, remove_stray_temps
from dihkit.runs.run_context import RunContext

# What the toolkit adds to an output's name in its folder: ``.<name>.<8 random characters>.tmp`` while a file
# is written (a lock file, ``.<name>.lock``, needs less).
NAME_ROOM = 14


@dataclass(frozen=True)
class RunPaths:
    """Files one phase writes: final output, best-validation output, resumable state, result."""
    final: Path
    best: Path
    state: Path
    result: Path

    @classmethod
    def for_output(cls, out: Path, is_dir: bool = False) -> "RunPaths":
        """Paths derived from ``--path_to_save`` (a file, or a directory of heads)."""
        out = Path(out)
        if is_dir:
            return cls(out, out / "best", out / "state.pth", out / "result.json")
        return cls(out, out.with_suffix(".best" + (out.suffix or ".pth")),
                   out.with_suffix(".state.pth"), out.with_suffix(".json"))

    @property
    def is_dir(self) -> bool:
        """True for a directory output (heads), whose state and result live inside it."""
        return self.state.parent == self.final

    def written(self) -> list[tuple[Path, str]]:
        """Every path the phase writes, with its role (a heads folder's own files lie inside it)."""
        if self.is_dir:
            return [(self.final, "heads folder")]
        return [(self.final, "model"), (self.best, "best-validation model"), (self.state, "checkpoint"),
                (self.result, "result file")]

    def finished(self) -> bool:
        """True when the result file records a completed run."""
        if not self.result.is_file():
            return False
        try:
            return json.loads(self.result.read_text()).get("complete", False)
        except (OSError, ValueError):
            return False


def library_versions() -> dict:
    """Versions that a result depends on."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}


def console_command(argv) -> str:
    """The shell line that runs the console with ``argv`` from the current directory (result files and the
    pipeline's plan record it; ``eval`` it there to rerun)."""
    script = os.path.relpath(Path(__file__).resolve().parents[2] / "final_test.py", Path.cwd())
    return shlex.join(["python3", script, *map(str, argv)])


def nearest_folder(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (made absolute, ``..`` resolved)."""
    folder = Path(os.path.abspath(path)).parent
    while not os.path.exists(folder):  # False, not an error, for a name too long to look up
        folder = folder.parent
    return folder


def check_writable(path: Path) -> None:
    """Refuse an output location whose nearest existing folder cannot be written, without writing."""
    folder = nearest_folder(path)
    if not folder.is_dir():
        raise UserError(f"cannot write '{path}': '{folder}' is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write '{path}': folder '{folder}' is not writable")


def output_exists(path: Path, is_dir: bool) -> bool:
    """Whether a model file, or a folder holding head files, is at ``path``."""
    if is_dir:
        return path.is_dir() and any(looks_like_head(p.name) for p in path.iterdir())
    return path.exists()


def check_claim(paths: RunPaths, training_type: str, resume: bool, overwrite: bool) -> bool:
    """Refuse outputs this run may not write (without changing anything); return whether the phase is finished.

    Without flags, any existing output or interrupted run's checkpoint is refused. ``--resume`` continues
    from the checkpoint, or skips a finished phase; ``--overwrite`` starts over.
    """
    kind = "a folder of heads" if paths.is_dir else "a model file"
    if paths.final.exists() and paths.final.is_dir() != paths.is_dir:
        raise UserError(f"output '{paths.final}' is {'a file' if paths.is_dir else 'a folder'}, but "
                        f"--training_type {training_type} writes {kind} there; choose another --path_to_save")
    for path in (paths.final, paths.state):
        check_writable(path)
    finished = paths.finished() and output_exists(paths.final, paths.is_dir)
    if overwrite:
        return False
    if paths.state.is_file():
        if not resume:
            raise UserError(f"an interrupted run's checkpoint '{paths.state}' exists; pass --resume to continue it "
                            f"or --overwrite to start over")
        return False
    if resume and finished:
        return True
    # Under --resume a best-validation output without a checkpoint comes from a run killed in its first
    # epoch, which restarts and rewrites it; otherwise it may belong to another run.
    outputs = [(paths.final, paths.is_dir), (paths.result, False)]
    if not resume:
        outputs.append((paths.best, paths.is_dir))
    existing = next((p for p, is_dir in outputs if output_exists(p, is_dir)), None)
    if existing is not None:
        hint = " or --resume to skip the finished run" if finished else ""
        raise UserError(f"output '{existing}' already exists; pass --overwrite to replace it{hint}")
    return False


def remove_output(path: Path, is_dir: bool) -> None:
    """Delete a stale output: a model file, or the head files of a heads folder."""
    if is_dir:
        if path.is_dir():
            for p in path.iterdir():
                if looks_like_head(p.name):
                    p.unlink()
    else:
        path.unlink(missing_ok=True)


def claim_outputs(ctx: RunContext, runs: list[RunPaths]) -> list[bool]:
    """Check every phase's outputs before anything trains; return which phases are already finished.

    A finished phase is skipped under ``--resume``; an existing output is never replaced without
    ``--overwrite``, which removes the previous run's checkpoint and best-validation output (the
    final output and result are replaced when the new run ends).
    """
    run = ctx.cfg.run
    # Every rank checks (they see the same files) and fails together: a rank failing alone would leave
    # the others waiting in the first collective. Nothing trains, so nothing is written, before all agree.
    done = ctx.dist.check_together(
        lambda: [check_claim(paths, ctx.cfg.training_type, run.resume, run.overwrite) for paths in runs])
    if run.overwrite and ctx.dist.is_main:
        for paths in runs:
            paths.state.unlink(missing_ok=True)
            remove_output(paths.best, paths.is_dir)
    ctx.dist.barrier()  # no rank may still see the removed checkpoint when the trainer looks for one to resume
    return done


def check_output_text(text: str | None) -> None:
    """Refuse a ``--path_to_save`` that names no file or folder of its own ('', '.', '/', '..')."""
    if text is not None and (not text.strip() or Path(text).name in ("", "..")):
        raise UserError(f"--path_to_save {text!r} names no file or folder of its own; give a name, e.g. runs/x.pth")


def check_name_length(path: Path) -> None:
    """Refuse an output whose name, with the room the toolkit adds (``NAME_ROOM``), or a folder still to be
    created for it, is longer than the file system allows."""
    folder = nearest_folder(path)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # the file system does not say: the common limit
        limit = 255
    parts = Path(os.path.abspath(path)).relative_to(folder).parts
    for i, part in enumerate(parts):
        need = len(part.encode()) + (NAME_ROOM if i == len(parts) - 1 else 0)
        if need > limit:
            raise UserError(f"the name '{part}' is too long for the file system of '{folder}': it allows {limit} bytes "
                            f"and this name needs {need} with the toolkit's suffixes; choose a shorter --path_to_save")


def overlap(a: tuple, b: tuple) -> str | None:
    """How two ``(resolved path, is a folder)`` entries collide: one path, or a folder holding the other."""
    (path_a, dir_a), (path_b, dir_b) = a, b
    if path_a == path_b:
        return "is the same path as"
    if dir_a and path_a in path_b.parents:
        return "is a folder holding"
    if dir_b and path_b in path_a.parents:
        return "lies inside"
    return None


def check_output_names(runs: list[RunPaths], inputs: list) -> None:
    """Refuse, before any work, outputs of ``runs`` that are one path, that are or hold or lie in an input
    (``inputs``: (flag name, path, is a folder)), compared as resolved paths (links and ``..`` followed), and
    output names too long for the file system."""
    outputs = [(f"the {role} '{p}'", Path(os.path.realpath(p)), paths.is_dir) for paths in runs
               for p, role in paths.written()]
    given = [(f"the input --{flag} '{p}'", Path(os.path.realpath(p)), is_dir) for flag, p, is_dir in inputs]
    for i, (what, path, is_dir) in enumerate(outputs):
        check_name_length(path)
        for other, other_path, other_is_dir in outputs[i + 1:] + given:
            relation = overlap((path, is_dir), (other_path, other_is_dir))
            if relation:
                raise UserError(f"{what} {relation} {other}; choose another --path_to_save")


class RunClaim:
    """One command's claim on every output of its phases and seeds, held by rank 0 under torchrun.

    ``check()`` refuses, without writing anything, outputs another live run claims or that exist (``check_claim``).
    Entering locks them all (``output_lock``), checks them again while holding the locks, so no other run
    can write between that check and this run's writes, and removes the temporary files of killed writes;
    leaving lets go of the locks.
    """

    def __init__(self, runs: list[RunPaths], training_type: str, resume: bool, overwrite: bool, active: bool):
        self.runs, self.training_type, self.resume, self.overwrite = runs, training_type, resume, overwrite
        self.active = active
        self.lock = OutputLock(p for paths in runs for p, _ in paths.written())

    def check(self) -> None:
        """Refuse outputs a live run claims (rank 0 only) or that this run may not write."""
        if self.active:
            self.lock.check_free()
        self.check_outputs()

    def check_outputs(self) -> None:
        """``check_claim`` for every phase."""
        for paths in self.runs:
            check_claim(paths, self.training_type, self.resume, self.overwrite)

    def __enter__(self) -> "RunClaim":
        if self.active:
            self.lock.acquire()
            try:
                self.check_outputs()
                for paths in self.runs:
                    for path, _ in paths.written():
                        for stray in remove_stray_temps(path, paths.is_dir):
                            print(f"removed '{stray}', left by a write that was interrupted", flush=True)
            except BaseException:
                self.lock.release()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()
