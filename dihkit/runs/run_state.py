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


class Interrupted(BaseException):
    """SIGINT/SIGTERM stopped the run (``StopFlag``). Like KeyboardInterrupt it is not an ``Exception``: it can be
    raised by the signal handler anywhere, and no ``except Exception`` may take it for an error."""

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


def kept_checkpoint(state: Path) -> str:
    """What a run stopped before writing its next checkpoint leaves to resume from."""
    return f"the last good checkpoint '{state}' is kept" if state.is_file() else "no checkpoint had been written yet"


class StopFlag:
    """Turns SIGINT/SIGTERM into a stop within moments, wherever it lands while a phase trains.

    Between training batches (``between_batches``, set by the loop once an epoch's first batch is done) the
    signal is a flag the loop reads after the current batch, which then writes a checkpoint. Anywhere else
    (an epoch's start: a resume's skipped batches, the first batch, compilation; evaluation; writing a
    checkpoint) waiting could take minutes, so the run stops at once and the last checkpoint is kept. A
    second signal always stops at once. Atomic writes keep every checkpoint whole wherever the stop lands.
    """

    # Batches between the ranks' agreement on the flag in a distributed run (each check is a host sync).
    SYNC_EVERY = 16

    def __init__(self, dist: Dist, checkpoint: Path):
        self.signum = None
        self.previous = {}
        self.dist = dist
        self.checkpoint = checkpoint
        self.between_batches = False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        """Remember the signal for the loop, or, outside the batches, stop at once (see the class)."""
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.between_batches:
            raise self.stopped("outside the training batches (an epoch's start, evaluation or a checkpoint)")

    def stopped(self, where: str, kept: str | None = None) -> Interrupted:
        """The exception that ends a signalled run, saying where it stopped and what is ``kept`` (default: the
        last checkpoint)."""
        kept = kept or kept_checkpoint(self.checkpoint)
        return Interrupted(f"stopped by signal {self.signum} {where}; {kept}: rerun the same command with --resume",
                           self.signum)

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


# The flags a resume may change, because none of them changes a number the run computes (docs/RELIABILITY.md).
# Every other flag the earlier run recorded must be the same, its ``auto`` values as they resolved.
MAY_CHANGE_ON_RESUME = frozenset({
    "resume", "overwrite", "summary",                   # what the command does, not what the run computes
    "seed", "concurrent_seeds", "path_to_save",         # which runs, and where: the run's own seed is compared
    "gpu_id", "dist_timeout",                           # where it runs (the resolved precision and layout count)
    "num_workers",                                      # each image draws its augmentation from its own seed
    "prefetch_factor", "persistent_workers",            # when the loader works, not what it yields
    "data_dir", "cache_dir", "no_cache",                # where the data come from: the data are compared
    "recipe", "recipe_values", "explicit_flags",        # how the values were set: the values are compared
    "methods", "teacher_epochs", "teacher_schedule",    # the pipeline's own: no step reads them
})


def may_change_on_resume(flag: str) -> bool:
    """Whether ``--flag`` may differ from the earlier run's on a resume; a trained input (``--saved_*``) may,
    because the frozen teacher and heads are compared by their weights, whatever file they come from."""
    return flag in MAY_CHANGE_ON_RESUME or flag.startswith("saved_")


def check_resume_args(state: dict, flags, seed: int, cohort_id: str | None, data_id: str, path: Path) -> None:
    """Refuse a resume that would change the numbers: any recorded flag but those that ``may_change_on_resume``
    (named with both values), the seed, the frozen teacher/heads (compared by their weights), or the data."""
    saved = state.get("args", {})
    for key, value in saved.items():
        # "auto" is what files written before the flags recorded their resolved values hold: not compared.
        if key in flags and not may_change_on_resume(key) and value not in (flags[key], "auto"):
            raise UserError(f"--resume refused: --{key} was {value!r} in the earlier run but is {flags[key]!r} now "
                            f"('{path}'); give the earlier value to continue it, or --overwrite to start over")
    if state.get("seed", seed) != seed:
        raise UserError(f"--resume refused: --seed was {state['seed']} in the earlier run '{path}' but is {seed} now")
    if state.get("cohort", cohort_id) != cohort_id:
        raise UserError(f"--resume refused: the frozen teacher or heads differ from those of the earlier run "
                        f"'{path}' (another --saved_path or heads folder)")
    check_same_data(state, data_id, path)


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
