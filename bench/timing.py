"""The bench's timed tasks on generated data: single steps, frozen inference, whole epochs, the data path alone.

Every step goes through the trainer's own code (``train_funcs.prepare_step``, ``forward_loss``,
``train_step``); whole epochs are ``train_funcs.Trainer(...).run()`` itself. Tasks are interleaved: each
repeat times every task once (the order reversed on odd repeats), so a change of machine load hits all alike.
"""
import contextlib
import io
import itertools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import dataload
from dihkit.runs.distributed import from_env
from dihkit.runs.method_contract import Method
from dihkit.foundations.registry import REGISTRY
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths
from dihkit.foundations.settings import Settings
from train_funcs import Trainer, forward_loss, make_optimizer, prepare_step, train_step

from bench.parts import FLOOR_STEP, SHAPES, type_settings

MIB = 2 ** 20
# The student's CE epoch timed on both data paths (over --loader_images images).
DATA_PATH_RUN = "ce_data_path"
# The same data drawn on both paths with nothing trained: the cost of the data path alone.
DATA_ONLY_RUN = "data_only"


def progress(message: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously to the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- data and context

def generated_split(n: int, classes: int, size: int, generator: torch.Generator) -> dataload.Split:
    """``n`` random uint8 images of the dataset's shape with random labels."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return dataload.Split(images, torch.randint(0, classes, (n,), generator=generator))


def generated_data(dataset: str, n_train: int, n_test: int, seed: int = 0) -> dataload.DataBundle:
    """A bundle of generated data shaped like ``dataset`` (its normalisation constants do not change the cost)."""
    classes, size, _ = SHAPES[dataset]
    g = torch.Generator().manual_seed(seed)
    info = dataload.DatasetInfo(f"generated-{dataset}", classes, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                tuple(str(c) for c in range(classes)))
    return dataload.DataBundle(info, generated_split(n_train, classes, size, g), None,
                               generated_split(n_test, classes, size, g))


def make_ctx(cfg: Settings, device: torch.device, data: dataload.DataBundle, out: Path) -> RunContext:
    """The run context a console run with the settings ``cfg`` would get (one process, seed 0)."""
    return RunContext(cfg, device, data, from_env(), 0, out)


# ----------------------------------------------------------------------------- steps

def train_task(method: Method, ctx: RunContext, batches: list):
    """One training step of ``method`` per call, as the trainer runs it (fixed batches, cycled)."""
    step_fn = prepare_step(method, ctx)
    opt, _ = make_optimizer([p for p in method.parameters() if p.requires_grad], ctx.cfg.optim)
    sums = torch.zeros(3, device=ctx.device)
    cycle = itertools.cycle(batches)
    method.train()

    def step():
        x, y, idx = next(cycle)
        loss, logits = forward_loss(step_fn, x, y, idx, ctx)
        train_step(opt, loss, logits, y, sums)
    return step


def inference_task(fn, ctx: RunContext, batches: list):
    """One frozen forward ``fn(x)`` per call, with the run's input format and autocast."""
    cycle = itertools.cycle(batches)

    def step():
        x, _, _ = next(cycle)
        if ctx.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx.autocast():
            fn(x)
    return step


def warm_up(tasks: dict, n: int, device: torch.device) -> dict:
    """Run each task ``n`` times untimed (compilation, allocator, lazy optimizer state); return its memory.

    CUDA: the peak allocated during the warm-up above what was allocated before it (activations, gradients,
    optimizer state: what one step adds to the resident models). CPU: the process's peak RSS (ru_maxrss)
    after the warm-up and its growth during it; a high-water mark of the whole process, so a task that needs
    less than an earlier one shows no growth.
    """
    memory = {}
    for name, task in tasks.items():
        if device.type == "cuda":
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        rss = max_rss_mib()
        for _ in range(max(n, 1)):
            task()
        synchronize(device)
        if device.type == "cuda":
            memory[name] = {"step_peak_mib": (torch.cuda.max_memory_allocated(device) - base) / MIB,
                            "resident_mib": base / MIB}
        else:
            memory[name] = {"process_peak_rss_mib": max_rss_mib(), "rss_growth_mib": max_rss_mib() - rss}
    return memory


def time_interleaved(tasks: dict, steps: int, repeats: int, device: torch.device, loads: list) -> dict:
    """Seconds per call of every task, one value per repeat; each repeat times every task in turn."""
    times = {name: [] for name in tasks}
    names = list(tasks)
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        progress(f"steps: repeat {r + 1}/{repeats} (load average {loads[-1]:.1f})")
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                tasks[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


# ----------------------------------------------------------------------------- epochs

def trainer_epoch(opts, method: Method, name: str, data_path: str, data: dataload.DataBundle, out: Path) -> float:
    """Training-loop seconds of one epoch of ``Trainer.run`` with ``name``'s settings (its ``epoch_time_s``:
    evaluation and checkpoints excluded)."""
    is_dir = REGISTRY[name].output_is_dir
    cfg = type_settings(opts, name, data_path, epochs=1)
    ctx = make_ctx(cfg, torch.device(opts.device), data, out if is_dir else out.with_suffix(".pth"))
    meta = {"arch": opts.student, "num_classes": data.info.num_classes, "dataset": data.info.name,
            "image_size": data.info.image_size, "seed": 0}
    paths = RunPaths.for_output(ctx.out, is_dir=is_dir)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        record = Trainer(method, ctx, paths, cfg.optim, name, meta).run()
    return record["history"][0]["epoch_time_s"]


def data_epoch(opts, data_path: str, data: dataload.DataBundle) -> float:
    """Seconds to draw one epoch of augmented batches on ``data_path`` onto the device, training nothing."""
    device = torch.device(opts.device)
    synchronize(device)
    start = time.perf_counter()
    for _ in dataload.train_batches(data.train, data.info, opts.batch_size, device, torch.Generator().manual_seed(0),
                                    data_path, opts.num_workers):
        pass
    synchronize(device)
    return time.perf_counter() - start


def epoch_runs(opts, methods: dict, tmp: Path) -> dict:
    """Every timed epoch: key -> (its data, a function of the repeat returning its seconds)."""
    data = generated_data(opts.dataset, opts.epoch_images, opts.test_images)
    loader_data = generated_data(opts.dataset, opts.loader_images, opts.test_images, seed=1)
    runs = {f"{name}/device": (data, lambda r, name=name: trainer_epoch(opts, methods[name], name, "device", data,
                                                                        tmp / f"{name}_{r}"))
            for name in opts.epoch_methods}
    if FLOOR_STEP in opts.epoch_methods:
        for path in ("device", "loader"):
            runs[f"{DATA_PATH_RUN}/{path}"] = (loader_data, lambda r, path=path: trainer_epoch(
                opts, methods[FLOOR_STEP], FLOOR_STEP, path, loader_data, tmp / f"{DATA_PATH_RUN}_{path}_{r}"))
            runs[f"{DATA_ONLY_RUN}/{path}"] = (loader_data, lambda r, path=path: data_epoch(opts, path, loader_data))
    return runs


def time_epochs(opts, methods: dict, tmp: Path, loads: list) -> dict:
    """Seconds of one epoch per run, interleaved over ``--epoch_repeats``.

    Each method trains one epoch on the device-resident path over ``--epoch_images`` images. Over
    ``--loader_images`` images, the student's CE epoch runs on both data paths, and so does the data path
    alone (batches drawn, nothing trained).
    """
    runs = epoch_runs(opts, methods, tmp)
    times = {key: [] for key in runs}
    for r in range(opts.epoch_repeats):
        loads.append(os.getloadavg()[0])
        progress(f"epochs: repeat {r + 1}/{opts.epoch_repeats} (load average {loads[-1]:.1f})")
        for key in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[key].append(runs[key][1](r))
    return {key: {"median_s": statistics.median(ts), "times_s": ts, "images": len(runs[key][0].train),
                  "images_per_s": len(runs[key][0].train) / statistics.median(ts)} for key, ts in times.items()}
