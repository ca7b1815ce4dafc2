"""The one training loop every method uses, evaluation, and the CE, head fine-tuning and KD methods.

A training type is a ``Method``: an ``nn.Module`` that owns only what it trains (student, heads,
regressors, ...) and whose ``forward(x, y, idx)`` returns ``(loss, logits)``. Frozen modules (teacher,
heads during DIH) are held in a ``Cohort`` outside the module tree, so the optimizer, state dicts,
``.train()`` and DDP never touch them. ``fit`` runs any Method: optimizer, schedule, progress, metrics,
evaluation, checkpoints, resume, signals and result files live here and only here.
"""
import json
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dataload
from checkpoints import FORMAT, atomic_save, atomic_write, load_model_file, model_record, safe_load
from dih_utils import HEAD_FILE, Cohort, build_heads, fingerprint, freeze, heads_meta, mount_shapes, save_heads
from distributed import Dist
from errors import UserError
from KD_Loss import dih_loss
from models_repo import build_model, count_parameters

# Arguments that change what a run trains: a resume with any of them different is refused. The seed
# and the frozen teacher/heads are checked too (the state records them), but not through this list:
# several seeds share one namespace, and the teacher is a file whose content matters, not its path.
RESUME_KEYS = ("training_type", "student", "teacher", "ta", "dataset", "val_size", "train_subset", "kd_alpha",
               "kd_temperature", "lr", "wd", "momentum", "nesterov", "schedule", "schedule_gamma", "epochs",
               "batch_size", "at_beta", "at_p", "beta", "hint_layer", "guided_layer", "epochs_fitnets_1",
               "lr_fitnets_1", "wd_fitnets_1", "momentum_fitnets_1", "nesterov_fitnets_1", "schedule_fitnets_1",
               "schedule_gamma_fitnets_1", "at_kd_alpha", "feat_dim", "nce_k", "nce_t", "nce_m", "scale_lr", "sync_bn")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a resumable checkpoint was written after the current batch."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite (``--nan_policy stop``)."""


@dataclass
class RunContext:
    """Everything one run of one seed needs, built once by the console."""
    args: object
    device: torch.device
    data: dataload.DataBundle
    dist: Dist
    seed: int
    out: Path                      # the run's --path_to_save, with the seed suffix applied
    log: list = field(default_factory=list)

    @property
    def info(self) -> dataload.DatasetInfo:
        """The dataset's description (classes, input size, normalization)."""
        return self.data.info

    def say(self, message: str) -> None:
        """One line on stdout from rank 0."""
        if self.dist.is_main:
            tqdm.write(message)


@dataclass(frozen=True)
class OptimConfig:
    """SGD and MultiStepLR settings of one training phase."""
    epochs: int
    lr: float
    wd: float
    milestones: tuple
    gamma: float
    momentum: float = 0.9
    nesterov: bool = True

    @classmethod
    def from_args(cls, args) -> "OptimConfig":
        """The run's main optimizer flags."""
        return cls(args.epochs, args.lr, args.wd, tuple(args.schedule), args.schedule_gamma,
                   args.momentum, args.nesterov)


class Method(nn.Module):
    """Base of every training type: registered submodules are trained; the cohort is frozen."""

    cohort = None  # a dih_utils.Cohort when the method distils from frozen models
    # True for a method some of whose trained parameters get no gradient in a step (DDP must then look
    # for them after every backward, which costs time; without it DDP stops with an error).
    find_unused_parameters = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """Return ``(loss, logits)`` for one training batch."""
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor) -> dict:
        """Named logits of the models being trained, for accuracy."""
        raise NotImplementedError

    def export(self, path: Path, meta: dict) -> None:
        """Write the trained model(s) to ``path`` (a file, or a directory for heads)."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> dict:
        """Named logits of the frozen cohort (teacher, heads), evaluated once per run on the test split."""
        logits = self.cohort(x)
        return {"teacher": logits[0], **{f"head_{i}": h for i, h in enumerate(logits[1:], start=1)}}


# ----------------------------------------------------------------------------- paths and records

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


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_outputs(fn, split: dataload.Split, ctx: RunContext) -> dict:
    """Top-1/top-5 (percent) of every named output of ``fn`` on ``split``; one host sync in all."""
    counts = None
    total = torch.zeros((), device=ctx.device)
    for x, y, _ in dataload.eval_batches(split, ctx.info, max(256, ctx.args.batch_size), ctx.device,
                                         ctx.dist.rank, ctx.dist.world_size):
        with autocast(ctx):
            outs = fn(x)
        if counts is None:
            counts = {name: torch.zeros(2, device=ctx.device) for name in outs}
        k = min(5, ctx.info.num_classes)
        for name, logits in outs.items():
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            counts[name][0] += hit[:, 0].sum()
            counts[name][1] += hit.any(dim=1).sum()
        total += y.numel()
    stacked = torch.stack([total.expand(2)] + list(counts.values()))
    ctx.dist.all_reduce_sum(stacked)
    stacked = stacked.cpu()
    n = stacked[0, 0].item()
    return {name: {"top1": 100.0 * row[0].item() / n, "top5": 100.0 * row[1].item() / n}
            for name, row in zip(counts, stacked[1:])}


def headline(metrics: dict) -> float:
    """The number a split's metrics are ranked by: mean top-1 over the outputs."""
    return sum(m["top1"] for m in metrics.values()) / len(metrics)


def autocast(ctx: RunContext):
    """bfloat16 autocast on the run's device (CUDA or CPU) with ``--amp``; a no-op otherwise.

    On a CPU it pays off only where the processor computes in bfloat16 natively (AVX512-BF16, AMX);
    losses stay float32 either way (KD_Loss).
    """
    if getattr(ctx.args, "amp", False):
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare_step(method: "Method", ctx: RunContext) -> nn.Module:
    """Put ``method`` and its frozen cohort on the run's device and memory format; return the step callable.

    ``--channels_last`` converts the cohort too: it is not a submodule, so ``method.to`` never reaches it.
    The callable is ``method``, wrapped in DDP under torchrun, and with ``--compile`` the wrapped module is
    compiled (Dynamo then splits the graph at DDP's gradient buckets, so their all-reduce still overlaps the backward).
    """
    args = ctx.args
    method.to(ctx.device)
    if getattr(args, "channels_last", False):
        method.to(memory_format=torch.channels_last)
        if method.cohort is not None:
            method.cohort.to(memory_format=torch.channels_last)
    model = ctx.dist.wrap(method, ctx.device, getattr(args, "sync_bn", False), method.find_unused_parameters)
    return torch.compile(model) if getattr(args, "compile", False) else model


def forward_loss(step_fn, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, ctx: RunContext):
    """One training forward as ``fit`` runs it: ``(float32 loss, logits)``.

    The input is made channels-last with ``--channels_last``; the whole forward, the frozen cohort's pass
    included, runs under ``--amp`` autocast (the backward pass is outside it, as autocast requires).
    """
    if getattr(ctx.args, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(ctx):
        loss, logits = step_fn(x, y, idx)
    return loss.float(), logits


def train_step(opt, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Back-propagate ``loss``, step ``opt``, and add the batch's loss, hits and size to ``sums`` on the device.

    Returns whether the loss was non-finite, as a device tensor: nothing here waits for the device.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        bad = ~torch.isfinite(loss)
        # Python numbers only: a tensor made from host data is copied to the device, and on CUDA that copy
        # waits for the device to finish its queue (a host sync every batch).
        sums[0] += torch.where(bad, 0.0, loss) * y.numel()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
    return bad


# ----------------------------------------------------------------------------- RNG and signals

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


# ----------------------------------------------------------------------------- the loop

def check_resume_args(state: dict, args, seed: int, cohort_id: str | None, path: Path) -> None:
    """Refuse a resume that would change what is trained: an argument of ``RESUME_KEYS``, the seed, or
    the frozen teacher/heads (compared by their weights, whatever file they now come from)."""
    saved, current = state.get("args", {}), vars(args)
    for key in RESUME_KEYS:
        if key in saved and key in current and saved[key] != current[key]:
            raise UserError(f"--resume refused: --{key} was {saved[key]!r} in the earlier run "
                            f"'{path}' but is {current[key]!r} now")
    if state.get("seed", seed) != seed:
        raise UserError(f"--resume refused: --seed was {state['seed']} in the earlier run '{path}' but is {seed} now")
    if state.get("cohort", cohort_id) != cohort_id:
        raise UserError(f"--resume refused: the frozen teacher or heads differ from those of the earlier run "
                        f"'{path}' (another --saved_path or heads folder)")


def cohort_fingerprint(method: "Method") -> str | None:
    """SHA-1 of the frozen teacher's and heads' weights, or None for a method without a cohort."""
    if method.cohort is None:
        return None
    return fingerprint(nn.ModuleList([method.cohort.teacher, method.cohort.heads]))


def make_optimizer(params, cfg: OptimConfig):
    """SGD with momentum (nesterov by default) and MultiStepLR."""
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return opt, sched


def load_resume_state(path: Path, phase: str, ctx: RunContext, cohort_id: str | None, targets: dict) -> dict:
    """Read the interrupted run's state, check it belongs to this run, and load it into ``targets``.

    ``targets`` maps the state's ``method``/``optimizer``/``scheduler`` entries to the objects they restore.
    """
    state = safe_load(path, "resume state")
    if state.get("format") != FORMAT or state.get("kind") != "run-state":
        raise UserError(f"resume state '{path}' is not a run checkpoint of this toolkit")
    if state.get("phase") != phase:
        raise UserError(f"resume state '{path}' belongs to phase {state.get('phase')}, not {phase}")
    check_resume_args(state, ctx.args, ctx.seed, cohort_id, path)
    try:
        for key, target in targets.items():
            target.load_state_dict(state[key])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise UserError(f"resume state '{path}' does not fit this run's {key} ({detail[:200]}); "
                        f"pass --overwrite to start over") from None
    return state


def check_finite(first_bad: torch.Tensor, phase: str, epoch: int, state: Path) -> None:
    """Raise NonFiniteLoss naming the epoch and batch where the loss first stopped being finite."""
    batch = int(first_bad.item())
    if batch >= 0:
        kept = (f"the last good checkpoint '{state}' is kept" if state.is_file()
                else "no checkpoint had been written yet")
        raise NonFiniteLoss(f"[{phase}] the loss became NaN or infinite at epoch {epoch + 1}, batch {batch + 1}; "
                            f"{kept} (use --nan_policy skip to drop such batches)")


def num_train_batches(n: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch and rank, matching ``dataload.train_batches`` (a 1-sample tail is dropped)."""
    per_rank = n // world_size
    full, rest = divmod(per_rank, batch_size)
    return full + (rest > 1)


def earliest_bad(first_bad: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The earliest batch whose loss was not finite on any rank (-1: none), the same on every rank."""
    if not dist.enabled:
        return first_bad
    never = torch.iinfo(torch.long).max
    earliest = dist.all_reduce_min(torch.where(first_bad < 0, never, first_bad))
    return torch.where(earliest == never, -1, earliest)


def all_finite(loss: torch.Tensor, dist: Dist) -> bool:
    """Whether the loss is finite on every rank (the ranks must skip the same batches)."""
    return not dist.any_true(not torch.isfinite(loss).item())


def fit(method: Method, ctx: RunContext, paths: RunPaths, cfg: OptimConfig, phase: str, meta: dict) -> dict:
    """Train ``method`` for ``cfg.epochs`` epochs and write its outputs; return the result record.

    Each epoch ends with evaluation (validation split if any, and test), a resumable checkpoint and,
    when validation improves, the best-validation export. The test split never selects anything.
    The checkpoint (``paths.state``) holds everything a resumed run needs to continue bit for bit:
    trained modules, optimizer, scheduler, position (epoch, batch), best-validation record, RNG states,
    seed, the frozen cohort's fingerprint and the arguments. A signal writes it after the current batch.
    """
    args, device, dist = ctx.args, ctx.device, ctx.dist
    step_fn = prepare_step(method, ctx)
    trainable = [p for p in method.parameters() if p.requires_grad]
    if getattr(args, "scale_lr", False):
        cfg = replace(cfg, lr=cfg.lr * dist.world_size)  # linear scaling: the global batch is world_size times larger
    opt, sched = make_optimizer(trainable, cfg)
    generator = torch.Generator().manual_seed(ctx.seed)
    cohort_id = cohort_fingerprint(method)
    record = {"format": FORMAT, "training_type": args.training_type, "phase": phase, "seed": ctx.seed,
              "cohort": cohort_id, "args": vars(args), "meta": meta,
              "trainable_parameters": sum(p.numel() for p in trainable),
              "history": [], "best_val": None, "nan_skipped": 0, "complete": False,
              "versions": library_versions(), "device": str(device), "world_size": dist.world_size,
              "outputs": {"final": str(paths.final)}}
    start_epoch, start_batch, partial_sums, elapsed_before = 0, 0, None, 0.0
    if getattr(args, "resume", False) and paths.state.is_file():
        state = load_resume_state(paths.state, phase, ctx, cohort_id,
                                  {"method": method, "optimizer": opt, "scheduler": sched})
        # One RNG state per rank (each rank has its own stream; the data generator is the same on all).
        if len(state["rng"]) != dist.world_size:
            raise UserError(f"--resume refused: '{paths.state}' was written by a run of {len(state['rng'])} "
                            f"process(es), this one has {dist.world_size}; resume with the same number")
        set_rng_state(state["rng"][dist.rank], generator, device)
        record.update(history=state["history"], best_val=state["best_val"], nan_skipped=state["nan_skipped"])
        start_epoch, start_batch, partial_sums = state["epoch"], state["batch"], state["partial_sums"]
        elapsed_before = state["elapsed"]
        ctx.say(f"[{phase}] resuming '{paths.state}' at epoch {start_epoch + 1}, batch {start_batch + 1}")
    else:
        if getattr(args, "resume", False):
            ctx.say(f"[{phase}] no checkpoint '{paths.state}' to resume: starting from the first epoch")
        ctx.say(f"[{phase}] trainable parameters: {record['trainable_parameters']:,}")
        if dist.enabled:
            # Each rank its own stream for dropout and sampling inside losses; the weights, identical on all
            # ranks, are already drawn, and the data order comes from ``generator``, identical on all ranks.
            seed_everything(dist.rank_seed(ctx.seed))
    if method.cohort is not None:
        record["reference_test"] = evaluate_outputs(method.reference, ctx.data.test, ctx)
        for name, m in record["reference_test"].items():
            ctx.say(f"[{phase}] frozen {name}: test top-1 {m['top1']:.2f}%")
    t0 = time.time()

    def save_state(epoch: int, batch: int, rng: dict, sums) -> None:
        rng = dist.gather(rng)  # every rank's own states: each resumes its own random stream
        if dist.is_main:
            atomic_save({"format": FORMAT, "kind": "run-state", "phase": phase, "epoch": epoch, "batch": batch,
                         "method": method.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": rng, "history": record["history"],
                         "best_val": record["best_val"], "nan_skipped": record["nan_skipped"],
                         "partial_sums": sums, "elapsed": elapsed_before + time.time() - t0, "seed": ctx.seed,
                         "cohort": cohort_id, "args": vars(args)}, paths.state)
        # No rank may exit before the checkpoint is whole: torchrun stops the others when one exits.
        dist.barrier()

    def interrupted(signum: int, where: str) -> Interrupted:
        return Interrupted(f"stopped by signal {signum} {where}; a checkpoint was written to '{paths.state}': "
                           f"rerun the same command with --resume", signum)

    n_batches = num_train_batches(len(ctx.data.train), args.batch_size, dist.world_size)
    with StopFlag(dist) as stop:
        for epoch in range(start_epoch, cfg.epochs):
            # The batches are drawn from the generator at the epoch's start: a run stopped mid-epoch saves
            # this state and replays the epoch's draws, skipping the batches already trained on.
            epoch_rng = rng_state(generator, device)
            skip = start_batch if epoch == start_epoch else 0
            sums = torch.zeros(3, device=device)  # sum of loss * n, correct, n
            if skip and dist.is_main:
                sums += partial_sums.to(device)
            first_bad = torch.full((), -1, device=device, dtype=torch.long)
            lr = opt.param_groups[0]["lr"]
            method.train()
            batches = dataload.train_batches(ctx.data.train, ctx.info, args.batch_size, device, generator,
                                             args.data_path, args.num_workers, dist.rank, dist.world_size)
            bar = tqdm(islice(batches, skip, None), total=n_batches, initial=skip, disable=not dist.is_main,
                       desc=f"{phase} {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       mininterval=0.5 if sys.stderr.isatty() else 30.0)
            epoch_start = last_refresh = time.time()
            seen = 0
            for b, (x, y, idx) in enumerate(bar, start=skip):
                loss, logits = forward_loss(step_fn, x, y, idx, ctx)
                if args.nan_policy == "skip" and not all_finite(loss, dist):
                    record["nan_skipped"] += 1
                else:
                    bad = train_step(opt, loss, logits, y, sums)
                    first_bad = torch.where(bad & (first_bad < 0), b, first_bad)
                    seen += y.numel()
                stopping = stop.requested(b)
                now = time.time()
                refresh = now - last_refresh > 1.0 or stopping
                # Ranks must raise together, so in a distributed run they check at the stop flag's agreed batches.
                if ((b + 1) % StopFlag.SYNC_EVERY == 0) if dist.enabled else refresh:
                    check_finite(earliest_bad(first_bad, dist), phase, epoch, paths.state)
                if refresh:
                    last_refresh = now
                    s = sums.tolist()
                    rate = seen * dist.world_size / max(now - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.3f}", acc=f"{100 * s[1] / max(s[2], 1):.1f}",
                                    lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                if stopping:
                    save_state(epoch, b + 1, epoch_rng, dist.all_reduce_sum(sums.clone()).cpu())
                    raise interrupted(stop.signum, f"in epoch {epoch + 1} after batch {b + 1}")
            bar.close()
            check_finite(earliest_bad(first_bad, dist), phase, epoch, paths.state)
            sched.step()
            s = dist.all_reduce_sum(sums).tolist()
            entry = {"epoch": epoch + 1, "lr": lr, "train_loss": s[0] / max(s[2], 1),
                     "train_top1": 100 * s[1] / max(s[2], 1), "epoch_time_s": time.time() - epoch_start}
            method.eval()
            dist.sync_buffers(method)
            if ctx.data.val is not None:
                entry["val"] = evaluate_outputs(method.evaluate, ctx.data.val, ctx)
            entry["test"] = evaluate_outputs(method.evaluate, ctx.data.test, ctx)
            record["history"].append(entry)
            if "val" in entry and (record["best_val"] is None or headline(entry["val"]) > record["best_val"]["val_top1"]):
                record["best_val"] = {"epoch": epoch + 1, "val_top1": headline(entry["val"]),
                                      "test_top1": headline(entry["test"]), "test": entry["test"]}
                if dist.is_main:
                    method.export(paths.best, {**meta, "epoch": epoch + 1, "selected_on": "validation"})
            line = f"[{phase}] epoch {epoch + 1}/{cfg.epochs} loss {entry['train_loss']:.4f} train {entry['train_top1']:.2f}%"
            if "val" in entry:
                line += f" val {headline(entry['val']):.2f}%"
            ctx.say(line + f" test {headline(entry['test']):.2f}% ({entry['epoch_time_s']:.1f}s)")
            save_state(epoch + 1, 0, rng_state(generator, device), None)
            # A signal during evaluation or saving stops here, at the epoch boundary, unless the run is done.
            if stop.requested() and epoch + 1 < cfg.epochs:
                raise interrupted(stop.signum, f"after epoch {epoch + 1}")
    final = record["history"][-1]["test"]
    record.update(final_test=final, test_top1=headline(final),
                  test_top5=sum(m["top5"] for m in final.values()) / len(final), last_epoch=cfg.epochs,
                  wall_time_s=elapsed_before + time.time() - t0, complete=True)
    if record["best_val"] is not None:
        record["outputs"]["best"] = str(paths.best)
    if dist.enabled:
        record["replica_fingerprint"] = dist.check_replicas(method)
    if dist.is_main:
        method.export(paths.final, {**meta, "epoch": cfg.epochs, "selected_on": "last epoch"})
        write_json(paths.result, record)
        paths.state.unlink(missing_ok=True)
    dist.barrier()  # the other ranks return once the outputs exist (a next phase or seed may read them)
    return record


# ----------------------------------------------------------------------------- outputs and models

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


def check_claim(paths: RunPaths, args) -> bool:
    """Refuse outputs this run may not write (without changing anything); return whether the phase is finished.

    Without flags, any existing output or interrupted run's checkpoint is refused. ``--resume`` continues
    from the checkpoint, or skips a finished phase; ``--overwrite`` starts over.
    """
    kind = "a folder of heads" if paths.is_dir else "a model file"
    if paths.final.exists() and paths.final.is_dir() != paths.is_dir:
        raise UserError(f"output '{paths.final}' is {'a file' if paths.is_dir else 'a folder'}, but "
                        f"--training_type {args.training_type} writes {kind} there; choose another --path_to_save")
    for path in (paths.final, paths.state):
        check_writable(path)
    finished = paths.finished() and output_exists(paths.final, paths.is_dir)
    if args.overwrite:
        return False
    if paths.state.is_file():
        if not args.resume:
            raise UserError(f"an interrupted run's checkpoint '{paths.state}' exists; pass --resume to continue it "
                            f"or --overwrite to start over")
        return False
    if args.resume and finished:
        return True
    # Under --resume a best-validation output without a checkpoint comes from a run killed in its first
    # epoch, which restarts and rewrites it; otherwise it may belong to another run.
    outputs = [(paths.final, paths.is_dir), (paths.result, False)]
    if not args.resume:
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
    # Every rank checks (they see the same files) and fails together: a rank failing alone would leave
    # the others waiting in the first collective. Nothing trains, so nothing is written, before all agree.
    done = ctx.dist.check_together(lambda: [check_claim(paths, ctx.args) for paths in runs])
    if ctx.args.overwrite and ctx.dist.is_main:
        for paths in runs:
            paths.state.unlink(missing_ok=True)
            remove_output(paths.best, paths.is_dir)
    ctx.dist.barrier()  # no rank may still see the removed checkpoint when fit looks for one to resume
    return done


def run_phase(method: Method, ctx: RunContext, paths: RunPaths, cfg: OptimConfig, phase: str, meta: dict,
              finished: bool) -> dict:
    """Train one phase, or, when it already finished under ``--resume``, return its saved record.

    A finished phase is only reused when it was trained with the same arguments, seed and cohort.
    """
    if finished:
        record = json.loads(paths.result.read_text())
        check_resume_args(record, ctx.args, ctx.seed, cohort_fingerprint(method), paths.result)
        ctx.say(f"[{phase}] already complete: '{paths.final}'")
        return record
    return fit(method, ctx, paths, cfg, phase, meta)


def model_meta(ctx: RunContext, arch: str, **extra) -> dict:
    """What a saved model records about itself and its run."""
    return {"arch": arch, "num_classes": ctx.info.num_classes, "dataset": ctx.info.name,
            "image_size": ctx.info.image_size, "training_type": ctx.args.training_type, "seed": ctx.seed, **extra}


def new_model(ctx: RunContext, arch: str) -> nn.Module:
    """A freshly initialised registry model for the run's dataset, on the run's device."""
    return build_model(arch, ctx.info.num_classes).to(ctx.device)


def skeleton(ctx: RunContext, arch: str) -> nn.Module:
    """A registry model on the meta device: its structure and size, without memory, time or RNG draws."""
    with torch.device("meta"):
        return build_model(arch, ctx.info.num_classes)


def load_trained(ctx: RunContext, arch: str, path, what: str) -> tuple[nn.Module, dict]:
    """A registry model with weights from ``path``, checked against ``arch`` and the dataset."""
    if path is None:
        raise UserError(f"{what} needs --saved_path (the trained {arch} checkpoint)")
    model = build_model(arch, ctx.info.num_classes)
    meta = load_model_file(path, model, arch, ctx.info.num_classes, what, ctx.info.name)
    if meta.get("image_size") not in (None, ctx.info.image_size):
        raise UserError(f"{what} '{path}' was trained on {meta['image_size']}px images, "
                        f"but {ctx.info.name} has {ctx.info.image_size}px")
    model = model.to(ctx.device)
    if getattr(ctx.args, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model, meta


def load_teacher(ctx: RunContext) -> nn.Module:
    """The frozen teacher named by ``--teacher`` and ``--saved_path``."""
    teacher, _ = load_trained(ctx, ctx.args.teacher, ctx.args.saved_path, "teacher checkpoint")
    return freeze(teacher)


# ----------------------------------------------------------------------------- methods

class StudentMethod(Method):
    """A method that trains one student model (plus optional extra modules saved with it)."""

    def __init__(self, student: nn.Module, meta: dict):
        super().__init__()
        self.student = student
        self.meta = meta

    def evaluate(self, x: torch.Tensor) -> dict:
        """The student's logits."""
        return {"student": self.student(x)}

    def export(self, path: Path, meta: dict) -> None:
        """The student's model file; extra modules (regressors, links, ...) ride along under ``extra``."""
        extra = {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                 for name, m in self.named_children() if name != "student"}
        atomic_save(model_record(self.student, **meta, extra_modules=extra), path)


class CrossEntropy(StudentMethod):
    """Plain supervised training: cross-entropy on the labels."""

    def forward(self, x, y, idx):
        """CE loss and logits."""
        logits = self.student(x)
        return F.cross_entropy(logits.float(), y), logits


class Distillation(StudentMethod):
    """KD from every member of a frozen cohort, summed (DIH); with no heads it is plain KD."""

    def __init__(self, student: nn.Module, meta: dict, cohort: Cohort, alpha: float, temperature: float):
        super().__init__(student, meta)
        self.cohort = cohort
        self.alpha, self.temperature = alpha, temperature

    def forward(self, x, y, idx):
        """The cohort's logits from one frozen pass, then the summed KD loss."""
        logits = self.student(x)
        return dih_loss(logits, self.cohort(x), y, self.alpha, self.temperature), logits


class HeadTuning(Method):
    """Fine-tune the intermediate heads of a frozen teacher: CE on each head, summed."""

    def __init__(self, teacher: nn.Module, heads: nn.ModuleList, heads_meta: dict):
        super().__init__()
        self.heads = heads
        self.cohort = Cohort(teacher)
        self.heads_meta = heads_meta

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head from one frozen teacher pass."""
        _, feats, _ = self.cohort.features(x)
        return [head(f) for head, f in zip(self.heads, feats)]

    def forward(self, x, y, idx):
        """Sum of the heads' CE losses; the deepest head's logits for training accuracy."""
        logits = self.head_logits(x)
        return sum(F.cross_entropy(l.float(), y) for l in logits), logits[-1]

    def evaluate(self, x):
        """Every head's logits."""
        return {f"head_{i}": l for i, l in enumerate(self.head_logits(x), start=1)}

    def export(self, path: Path, meta: dict) -> None:
        """``head_1.pth`` ... ``head_k.pth`` in the directory ``path``."""
        save_heads(self.heads, path, self.heads_meta, epoch=meta["epoch"], selected_on=meta["selected_on"],
                   seed=meta["seed"])


# ----------------------------------------------------------------------------- entry points

def train_ce(ctx: RunContext) -> dict:
    """``--training_type ce``: train ``--teacher`` from scratch with cross-entropy."""
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    arch = ctx.args.teacher
    method = CrossEntropy(new_model(ctx, arch), model_meta(ctx, arch))
    return run_phase(method, ctx, paths, OptimConfig.from_args(ctx.args), "ce", method.meta, done)


def fine_tune(ctx: RunContext) -> dict:
    """``--training_type fine_tune``: train the teacher's k heads jointly on its frozen backbone."""
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out, is_dir=True)
    done, = claim_outputs(ctx, [paths])
    shapes = mount_shapes(teacher, ctx.info.image_size)
    meta = heads_meta(ctx.args.teacher, ctx.info.num_classes, ctx.info.image_size, ctx.info.name, shapes,
                      fingerprint(teacher))
    heads = build_heads(teacher, ctx.info.num_classes, ctx.info.image_size).to(ctx.device)
    ctx.say(f"[fine_tune] {len(heads)} heads on {ctx.args.teacher}: "
            + ", ".join(f"{count_parameters(h):,}" for h in heads) + " parameters")
    method = HeadTuning(teacher, heads, meta)
    return run_phase(method, ctx, paths, OptimConfig.from_args(ctx.args), "fine_tune",
                     {**meta, "seed": ctx.seed}, done)


def distil(ctx: RunContext, teacher: nn.Module, heads, student_arch: str, paths: RunPaths, phase: str,
           finished: bool, student: nn.Module | None = None, **extra_meta) -> dict:
    """Train ``student_arch`` with KD from ``teacher`` (and DIH when ``heads`` are given).

    ``student``: an already initialised student (FitNets stage 2), else a fresh one; ``extra_meta`` is
    recorded in the model and result files.
    """
    args = ctx.args
    cohort = Cohort(teacher, heads)
    meta = model_meta(ctx, student_arch, teacher=args.teacher, kd_alpha=args.kd_alpha,
                      kd_temperature=args.kd_temperature, num_heads=len(cohort.heads), **extra_meta)
    if student is None:
        student = new_model(ctx, student_arch)
    method = Distillation(student, meta, cohort, args.kd_alpha, args.kd_temperature)
    return run_phase(method, ctx, paths, OptimConfig.from_args(args), phase, meta, finished)


def train_kd(ctx: RunContext) -> dict:
    """``--training_type kd``: the student learns from the trained teacher's final logits."""
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    return distil(ctx, teacher, None, ctx.args.student, paths, "kd", done)
