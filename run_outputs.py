"""The files a phase writes, and the claim a run makes on them before anything trains."""
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoints import atomic_write
from dih_utils import HEAD_FILE
from errors import UserError
from run_context import RunContext


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


def write_json(path: Path, obj: dict) -> None:
    """Write a JSON file atomically."""
    text = json.dumps(obj, indent=2, default=str).encode()
    atomic_write(path, lambda f: f.write(text))


def check_writable(path: Path) -> None:
    """Refuse an output location whose nearest existing folder cannot be written, without writing."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write '{path}': '{folder}' is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write '{path}': folder '{folder}' is not writable")


def output_exists(path: Path, is_dir: bool) -> bool:
    """Whether a model file, or a folder holding head files, is at ``path``."""
    if is_dir:
        return path.is_dir() and any(HEAD_FILE.match(p.name) for p in path.iterdir())
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
                if HEAD_FILE.match(p.name):
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
