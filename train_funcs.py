"""The one training loop every method uses: the trainer, its step, evaluation and export, and one phase's run.

A training type builds a ``Method`` (``method_contract``) and calls ``run_phase``; the ``Trainer`` does the
rest: optimizer and schedule, the epochs and their progress display, the NaN policy, evaluation every
epoch, best-validation export, resumable checkpoints (``run_state``), signals and the result file.
"""
import json
import os
import sys
import time
from dataclasses import replace

import torch
from torch import nn
from tqdm import tqdm

import dataload
from dihkit.files.checkpoints import FORMAT, atomic_save
from dihkit.runs.distributed import Dist
from dihkit.foundations.errors import UserError
from dihkit.runs.evaluation import evaluate_outputs, headline
from dihkit.runs.method_contract import Method
from dihkit.runs.run_context import RunContext
from dihkit.files.atomic_files import atomic_write_json
from dihkit.runs.run_outputs import RunPaths, library_versions
from dihkit.runs.run_state import (StopFlag, check_resume_args, cohort_fingerprint, kept_checkpoint, load_resume_state,
                                   rng_state, seed_everything, set_rng_state)
from dihkit.foundations.settings import OptimSettings


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite (``--nan_policy stop``)."""


def make_optimizer(params, cfg: OptimSettings):
    """SGD with momentum (nesterov by default) and MultiStepLR."""
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return opt, sched


def prepare_cohort(cohort, ctx: RunContext) -> int:
    """Make a frozen cohort ready for the run's inference: its batch norms folded into the convolutions before
    them (``Cohort.fold``; the bench turns this off to measure it), then the run's memory format. Returns
    how many batch norms were folded."""
    count = cohort.fold() if ctx.cfg.run.fold else 0
    if ctx.cfg.run.channels_last:
        cohort.to(memory_format=torch.channels_last)
    return count


def prepare_step(method: Method, ctx: RunContext) -> nn.Module:
    """Put ``method`` and its frozen cohort on the run's device and memory format; return the step callable.

    The cohort is prepared apart (``prepare_cohort``): not a submodule, ``method.to`` never reaches it.
    The callable is ``method``, wrapped in DDP under torchrun, and with ``--compile`` the wrapped module is
    compiled (Dynamo then splits the graph at DDP's gradient buckets, so their all-reduce still overlaps the backward).
    """
    run = ctx.cfg.run
    method.to(ctx.device)
    if method.cohort is not None:
        folded = prepare_cohort(method.cohort, ctx)
        if folded:
            ctx.say(f"frozen cohort: {folded} batch norms folded into the convolutions before them")
    if run.channels_last:
        method.to(memory_format=torch.channels_last)
    model = ctx.dist.wrap(method, ctx.device, run.sync_bn, method.find_unused_parameters)
    return torch.compile(model) if run.compile else model


def forward_loss(step_fn, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, ctx: RunContext):
    """One training forward as the trainer runs it: ``(float32 loss, logits)``.

    The input is made channels-last with ``--memory_format channels_last``; the whole forward, the frozen
    cohort's pass included, runs under bf16 autocast with ``--precision bf16`` (the backward pass is outside it,
    as autocast requires).
    """
    if ctx.cfg.run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with ctx.autocast():
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


def num_train_batches(n: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch and rank, matching ``dataload.train_batches`` (a 1-sample tail is dropped)."""
    full, rest = divmod(n // world_size, batch_size)
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


class EpochProgress:
    """The progress bar of one epoch: batches done, running loss and accuracy, learning rate, images/s.

    The count is advanced explicitly after each batch, so a log file (not a terminal) shows the batches
    done whenever the bar is written, not the count at the epoch's start.
    """

    def __init__(self, desc: str, total: int, initial: int, enabled: bool, world_size: int):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, leave=False,
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.world_size = world_size
        self.start = self.last = time.time()
        self.seen = 0

    def advance(self, images: int) -> None:
        """One batch of ``images`` images trained (or skipped: 0)."""
        self.seen += images
        self.bar.update(1)

    def due(self) -> bool:
        """Whether a second has passed since the figures were last refreshed."""
        return time.time() - self.last > 1.0

    def refresh(self, sums: torch.Tensor, lr: float) -> None:
        """Show the running figures (one host sync)."""
        self.last = now = time.time()
        s = sums.tolist()
        rate = self.seen * self.world_size / max(now - self.start, 1e-9)
        self.bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.3f}", acc=f"{100 * s[1] / max(s[2], 1):.1f}",
                             lr=f"{lr:.3g}", img_s=f"{rate:.0f}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Remove the bar, also when the epoch ends by an exception (its message then starts a clean line)."""
        self.bar.close()


def check_finite(first_bad: torch.Tensor, phase: str, epoch: int, state) -> None:
    """Raise NonFiniteLoss naming the epoch and batch where the loss first stopped being finite."""
    batch = int(first_bad.item())
    if batch >= 0:
        raise NonFiniteLoss(f"[{phase}] the loss became NaN or infinite at epoch {epoch + 1}, batch {batch + 1}; "
                            f"{kept_checkpoint(state)} (use --nan_policy skip to drop such batches)")


def check_skipped(skipped: int, total: int, phase: str, epoch: int, state) -> None:
    """Stop a ``--nan_policy skip`` run whose epoch skipped more than half its batches: it no longer trains."""
    if 2 * skipped > total:
        raise NonFiniteLoss(f"[{phase}] {skipped} of the {total} batches of epoch {epoch + 1} had a NaN or infinite "
                            f"loss and were skipped, more than half (where --nan_policy skip stops a run); "
                            f"{kept_checkpoint(state)}")


class Trainer:
    """Trains one ``Method`` for one phase and writes its outputs.

    Each epoch ends with evaluation (validation split if any, and test), a resumable checkpoint and,
    when validation improves, the best-validation export. The test split never selects anything.
    The checkpoint (``paths.state``) holds everything a resumed run needs to continue bit for bit:
    trained modules, optimizer, scheduler, position (epoch, batch), best-validation record, RNG states,
    seed, the frozen cohort's fingerprint and the flags. A signal writes it after the current batch.
    """

    def __init__(self, method: Method, ctx: RunContext, paths: RunPaths, cfg: OptimSettings, phase: str, meta: dict):
        self.method, self.ctx, self.paths, self.phase, self.meta = method, ctx, paths, phase, meta
        self.dist, self.device = ctx.dist, ctx.device
        # The cohort as loaded, before prepare_step folds it: resume must not depend on this device's rounding.
        self.cohort_id = cohort_fingerprint(method)
        self.step_fn = prepare_step(method, ctx)
        trainable = [p for p in method.parameters() if p.requires_grad]
        if ctx.cfg.run.scale_lr:
            cfg = replace(cfg, lr=cfg.lr * ctx.dist.world_size)  # linear scaling: the global batch grows
        self.cfg = cfg
        self.opt, self.sched = make_optimizer(trainable, cfg)
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.data_id = dataload.data_fingerprint(ctx.data)
        self.record = {"format": FORMAT, "training_type": ctx.cfg.training_type, "phase": phase, "seed": ctx.seed,
                       "cohort": self.cohort_id, "data": self.data_id, "args": dict(ctx.cfg.flags),
                       # Enough to rerun it: `cd <cwd> && eval "<command>"` (docs/PIPELINES.md).
                       "command": ctx.cfg.command, "cwd": os.getcwd(), "meta": meta,
                       "trainable_parameters": sum(p.numel() for p in trainable),
                       "history": [], "best_val": None, "nan_skipped": 0, "complete": False,
                       "versions": library_versions(), "device": str(ctx.device),
                       "precision": ctx.cfg.run.precision, "memory_format": ctx.cfg.run.memory_format,
                       "speed_reason": ctx.cfg.run.speed_reason,
                       "world_size": ctx.dist.world_size, "outputs": {"final": str(paths.final)}}
        self.start_epoch, self.start_batch, self.partial_sums, self.elapsed_before = 0, 0, None, 0.0
        self.t0 = time.time()

    def check_state(self, state: dict) -> None:
        """Refuse a checkpoint written with other flags, seed, frozen cohort or training data."""
        check_resume_args(state, self.ctx.cfg.flags, self.ctx.seed, self.cohort_id, self.data_id, self.paths.state)

    def resume_or_start(self) -> None:
        """Load the interrupted run's checkpoint under ``--resume``; otherwise announce a fresh start."""
        ctx, phase, state_path = self.ctx, self.phase, self.paths.state
        if ctx.cfg.run.resume and state_path.is_file():
            state = load_resume_state(state_path, phase, self.check_state,
                                      {"method": self.method, "optimizer": self.opt, "scheduler": self.sched})
            # One RNG state per rank (each rank has its own stream; the data generator is the same on all).
            if len(state["rng"]) != self.dist.world_size:
                raise UserError(f"--resume refused: '{state_path}' was written by a run of {len(state['rng'])} "
                                f"process(es), this one has {self.dist.world_size}; resume with the same number")
            set_rng_state(state["rng"][self.dist.rank], self.generator, self.device)
            self.record.update(history=state["history"], best_val=state["best_val"], nan_skipped=state["nan_skipped"])
            self.start_epoch, self.start_batch = state["epoch"], state["batch"]
            self.partial_sums, self.elapsed_before = state["partial_sums"], state["elapsed"]
            ctx.say(f"[{phase}] resuming '{state_path}' at epoch {self.start_epoch + 1}, batch {self.start_batch + 1}")
            return
        if ctx.cfg.run.resume:
            ctx.say(f"[{phase}] no checkpoint '{state_path}' to resume: starting from the first epoch")
        ctx.say(f"[{phase}] trainable parameters: {self.record['trainable_parameters']:,}; "
                f"lr milestones {list(self.cfg.milestones)} of {self.cfg.epochs} epochs")
        if self.dist.enabled:
            # Each rank its own stream for dropout and sampling inside losses; the weights, identical on all
            # ranks, are already drawn, and the data order comes from ``generator``, identical on all ranks.
            seed_everything(self.dist.rank_seed(ctx.seed))

    def save_state(self, epoch: int, batch: int, rng: dict, sums) -> None:
        """Write the resumable checkpoint (rank 0), every rank's RNG state included."""
        rng = self.dist.gather(rng)
        if self.dist.is_main:
            atomic_save({"format": FORMAT, "kind": "run-state", "phase": self.phase, "epoch": epoch, "batch": batch,
                         "method": self.method.state_dict(), "optimizer": self.opt.state_dict(),
                         "scheduler": self.sched.state_dict(), "rng": rng, "history": self.record["history"],
                         "best_val": self.record["best_val"], "nan_skipped": self.record["nan_skipped"],
                         "partial_sums": sums, "elapsed": self.elapsed_before + time.time() - self.t0,
                         "seed": self.ctx.seed, "cohort": self.cohort_id, "data": self.data_id,
                         "args": dict(self.ctx.cfg.flags)}, self.paths.state)
        # No rank may exit before the checkpoint is whole: torchrun stops the others when one exits.
        self.dist.barrier()

    def run(self) -> dict:
        """Every remaining epoch, then the final outputs; returns the result record."""
        self.resume_or_start()
        self.ctx.data.write_held_cache()  # the resume's checks passed: its data's decode cache may be written
        if self.method.cohort is not None:
            self.record["reference_test"] = evaluate_outputs(self.method.reference, self.ctx.data.test, self.ctx)
            for name, m in self.record["reference_test"].items():
                self.ctx.say(f"[{self.phase}] frozen {name}: test top-1 {m['top1']:.2f}%")
        with StopFlag(self.dist, self.paths.state) as stop:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                entry = self.train_epoch(epoch, stop)
                self.end_epoch(epoch, entry)
                # A signal as the epoch's batches ended stops here, its checkpoint written, or once the run is done.
                if stop.requested() and epoch + 1 < self.cfg.epochs:
                    raise stop.stopped(f"after epoch {epoch + 1}")
        record = self.finish()
        if stop.requested():  # never dropped: the command stops rather than going on to a next phase or step
            raise stop.stopped("as the run ended", f"its outputs are complete ('{self.paths.final}')")
        return record

    def train_epoch(self, epoch: int, stop: StopFlag) -> dict:
        """One epoch of training steps; returns the epoch's history entry (loss, accuracy, lr, time)."""
        ctx, dist, data = self.ctx, self.dist, self.ctx.cfg.data
        # The batches are drawn from the generator at the epoch's start: a run stopped mid-epoch saves
        # this state and replays the epoch's draws, skipping the batches already trained on.
        epoch_rng = rng_state(self.generator, self.device)
        skip = self.start_batch if epoch == self.start_epoch else 0
        sums = torch.zeros(3, device=self.device)  # sum of loss * n, correct, n
        if skip and dist.is_main:
            sums += self.partial_sums.to(self.device)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        lr = self.opt.param_groups[0]["lr"]
        self.method.train()
        batches = dataload.train_batches(ctx.data.train, ctx.info, data.batch_size, self.device, self.generator,
                                         data.data_path, rank=dist.rank, world_size=dist.world_size, skip=skip,
                                         padding=data.crop_padding, **data.loader_options())
        total = num_train_batches(len(ctx.data.train), data.batch_size, dist.world_size)
        with EpochProgress(f"{self.phase} {epoch + 1}/{self.cfg.epochs}", total, skip, dist.is_main,
                           dist.world_size) as progress:
            for b, (x, y, idx) in enumerate(batches, start=skip):
                first_bad = self.step(x, y, idx, b, sums, first_bad, progress)
                stop.between_batches = True
                stopping = stop.requested(b)
                refresh = progress.due() or stopping
                # Ranks must raise together: in a distributed run they check at the stop flag's agreed batches.
                if ((b + 1) % StopFlag.SYNC_EVERY == 0) if dist.enabled else refresh:
                    check_finite(earliest_bad(first_bad, dist), self.phase, epoch, self.paths.state)
                if refresh:
                    progress.refresh(sums, lr)
                if stopping:
                    self.save_state(epoch, b + 1, epoch_rng, dist.all_reduce_sum(sums.clone()).cpu())
                    raise stop.stopped(f"in epoch {epoch + 1} after batch {b + 1}",
                                       f"a checkpoint was written to '{self.paths.state}'")
        stop.between_batches = False
        check_finite(earliest_bad(first_bad, dist), self.phase, epoch, self.paths.state)
        # The epoch's own count: the record's total less the earlier epochs' (right after a mid-epoch resume too).
        skipped = self.record["nan_skipped"] - sum(e.get("nan_skipped", 0) for e in self.record["history"])
        check_skipped(skipped, total, self.phase, epoch, self.paths.state)
        self.sched.step()
        s = dist.all_reduce_sum(sums).tolist()
        return {"epoch": epoch + 1, "lr": lr, "train_loss": s[0] / max(s[2], 1),
                "train_top1": 100 * s[1] / max(s[2], 1), "nan_skipped": skipped,
                "epoch_time_s": time.time() - progress.start}

    def step(self, x, y, idx, b: int, sums: torch.Tensor, first_bad: torch.Tensor, progress: EpochProgress):
        """One training step (skipped under ``--nan_policy skip`` when the loss is not finite); returns
        the index of the first batch with a non-finite loss so far (-1: none), as a device tensor."""
        loss, logits = forward_loss(self.step_fn, x, y, idx, self.ctx)
        if self.ctx.cfg.run.nan_policy == "skip" and not all_finite(loss, self.dist):
            self.record["nan_skipped"] += 1
            progress.advance(0)
            return first_bad
        bad = train_step(self.opt, loss, logits, y, sums)
        progress.advance(y.numel())
        return torch.where(bad & (first_bad < 0), b, first_bad)

    def end_epoch(self, epoch: int, entry: dict) -> None:
        """Evaluate, export the best-validation model when it improved, print the epoch line, checkpoint."""
        ctx, record = self.ctx, self.record
        self.method.eval()
        self.dist.sync_buffers(self.method)
        if ctx.data.val is not None:
            entry["val"] = evaluate_outputs(self.method.evaluate, ctx.data.val, ctx)
            self.method.observe_validation(epoch + 1, entry["val"])
        entry["test"] = evaluate_outputs(self.method.evaluate, ctx.data.test, ctx)
        record["history"].append(entry)
        if "val" in entry and (record["best_val"] is None or headline(entry["val"]) > record["best_val"]["val_top1"]):
            record["best_val"] = {"epoch": epoch + 1, "val_top1": headline(entry["val"]),
                                  "test_top1": headline(entry["test"]), "test": entry["test"]}
            if self.dist.is_main:
                self.method.export(self.paths.best, {**self.meta, "epoch": epoch + 1, "selected_on": "validation"})
        ctx.say(self.epoch_line(entry))
        self.save_state(epoch + 1, 0, rng_state(self.generator, self.device), None)

    def epoch_line(self, entry: dict) -> str:
        """The line printed after each epoch; several outputs (heads) are listed one by one."""
        line = (f"[{self.phase}] epoch {entry['epoch']}/{self.cfg.epochs} loss {entry['train_loss']:.4f} "
                f"train {entry['train_top1']:.2f}%")
        for split in ("val", "test"):
            if split in entry:
                metrics = entry[split]
                line += f" {split} {headline(metrics):.2f}%"
                if len(metrics) > 1:
                    line += " (" + ", ".join(f"{name} {m['top1']:.2f}" for name, m in metrics.items()) + ")"
        return line + f" ({entry['epoch_time_s']:.1f}s)"

    def finish(self) -> dict:
        """Record the last epoch's test metrics, export the final model, write the result, drop the checkpoint."""
        record, paths, dist = self.record, self.paths, self.dist
        final = record["history"][-1]["test"]
        record.update(final_test=final, test_top1=headline(final),
                      test_top5=sum(m["top5"] for m in final.values()) / len(final), last_epoch=self.cfg.epochs,
                      wall_time_s=self.elapsed_before + time.time() - self.t0, complete=True)
        if record["best_val"] is not None:
            record["outputs"]["best"] = str(paths.best)
        if dist.enabled:
            record["replica_fingerprint"] = dist.check_replicas(self.method)
        if dist.is_main:
            self.method.export(paths.final, {**self.meta, "epoch": self.cfg.epochs, "selected_on": "last epoch"})
            atomic_write_json(paths.result, record)
            paths.state.unlink(missing_ok=True)
        dist.barrier()  # the other ranks return once the outputs exist (a next phase or seed may read them)
        return record


def run_phase(method: Method, ctx: RunContext, paths: RunPaths, cfg: OptimSettings, phase: str, meta: dict,
              finished: bool) -> dict:
    """Train one phase, or, when it already finished under ``--resume``, return its saved record.

    A finished phase is only reused when it was trained with the same flags, seed and cohort.
    """
    if finished:
        record = json.loads(paths.result.read_text())
        check_resume_args(record, ctx.cfg.flags, ctx.seed, cohort_fingerprint(method),
                          dataload.data_fingerprint(ctx.data), paths.result)
        ctx.data.write_held_cache()
        ctx.say(f"[{phase}] already complete: '{paths.final}'")
        return record
    return Trainer(method, ctx, paths, cfg, phase, meta).run()
