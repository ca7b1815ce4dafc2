"""What a resumed run needs: random states, the interrupted run's checkpoint and its checks, and signals."""
import random
import signal
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dihkit.files.checkpoints import FORMAT, safe_load
from dih_utils import fingerprint
from dihkit.runs.distributed import Dist
from dihkit.foundations.errors import UserError


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a resumable checkpoint was written after the current batch."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """All random states a resumed run needs, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state(), "data": generator.get_state()}
    # Only the training device's: get_rng_state_all would open a CUDA context on every visible GPU
    # (under torchrun, every process on every GPU of the node).
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop reads after each batch; a second signal stops at once."""

    # Batches between the ranks' agreement on the flag in a distributed run (each check is a host sync).
    SYNC_EVERY = 16

    def __init__(self, dist: Dist):
        self.signum = None
        self.previous = {}
        self.dist = dist

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        """Remember the signal; the loop stops after the current batch. A second signal does not wait:
        atomic writes guarantee the last checkpoint is whole wherever the interruption lands."""
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, batch: int | None = None) -> bool:
        """Whether to stop now (``batch``: index of the batch just done; None at the end of an epoch).

        In a distributed run every rank must stop at the same batch, so the ranks agree on the flag
        every ``SYNC_EVERY`` batches and at each epoch's end; a single process reads it after every batch.
        """
        if self.dist.enabled and batch is not None and (batch + 1) % self.SYNC_EVERY:
            return False
        stop = self.dist.any_true(self.signum is not None)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return stop

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_resume_args(state: dict, flags, keys, seed: int, cohort_id: str | None, path: Path) -> None:
    """Refuse a resume that would change what is trained: a flag of ``keys``, the seed, or the frozen
    teacher/heads (compared by their weights, whatever file they now come from)."""
    saved = state.get("args", {})
    for key in keys:
        if key in saved and key in flags and saved[key] != flags[key]:
            raise UserError(f"--resume refused: --{key} was {saved[key]!r} in the earlier run "
                            f"'{path}' but is {flags[key]!r} now")
    if state.get("seed", seed) != seed:
        raise UserError(f"--resume refused: --seed was {state['seed']} in the earlier run '{path}' but is {seed} now")
    if state.get("cohort", cohort_id) != cohort_id:
        raise UserError(f"--resume refused: the frozen teacher or heads differ from those of the earlier run "
                        f"'{path}' (another --saved_path or heads folder)")


def check_same_data(state: dict, data_id: str, path: Path) -> None:
    """Refuse a resume on other training data than the earlier run's (files written before the
    fingerprint was recorded carry none and are not checked)."""
    if state.get("data", data_id) != data_id:
        raise UserError(f"--resume refused: the training data differ from those of the earlier run '{path}' "
                        f"(another --data_dir, other files in it, --train_subset, --label_noise or --val_size)")


def cohort_fingerprint(method: nn.Module) -> str | None:
    """SHA-1 of the frozen teacher's and heads' weights, or None for a method without a cohort."""
    if method.cohort is None:
        return None
    return fingerprint(nn.ModuleList([method.cohort.teacher, method.cohort.heads]))


def load_resume_state(path: Path, phase: str, check, targets: dict) -> dict:
    """Read the interrupted run's state, check it belongs to this run (``check(state)``), and load it
    into ``targets``, which maps the state's ``method``/``optimizer``/``scheduler`` entries to their objects."""
    state = safe_load(path, "resume state")
    if state.get("format") != FORMAT or state.get("kind") != "run-state":
        raise UserError(f"resume state '{path}' is not a run checkpoint of this toolkit")
    if state.get("phase") != phase:
        raise UserError(f"resume state '{path}' belongs to phase {state.get('phase')}, not {phase}")
    check(state)
    try:
        for key, target in targets.items():
            target.load_state_dict(state[key])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise UserError(f"resume state '{path}' does not fit this run's {key} ({detail[:200]}); "
                        f"pass --overwrite to start over") from None
    return state
