"""Which device a run trains on, how its backends behave, and where its batches are made."""
import os
import sys
from dataclasses import replace

import torch

import dataload
from dihkit.foundations.errors import UserError
from dihkit.foundations.settings import DataSettings, RunSettings
from dihkit.runs.distributed import Dist, SharedUserError


def resolve_device(gpu_id: str | None, local_rank: int = 0) -> torch.device:
    """``cuda:N`` or ``cpu``; the default is cuda:<local rank> when CUDA is available, else cpu."""
    if gpu_id is None:
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        print("notice: CUDA is not available; training on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(gpu_id)
    except RuntimeError:
        raise UserError(f"--gpu_id must be cuda:N or cpu, got '{gpu_id}'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else local_rank
        if index >= count:
            raise UserError(f"--gpu_id {gpu_id} does not exist: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UserError(f"--gpu_id must be cuda:N or cpu, got '{gpu_id}'")
    return device


def configure_backends(deterministic: bool) -> None:
    """cuDNN benchmarking unless ``deterministic``, which also forces deterministic algorithms."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: a process running several commands (tests) must not inherit the previous one's mode.
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def resolve_data_path(choice: str, data: dataload.DataBundle, device: torch.device) -> tuple[str, str]:
    """(data path, why): ``stream`` for streamed data; ``auto`` becomes ``device`` when the training images fit
    comfortably in the device's memory, else ``loader``."""
    if data.streamed:
        return "stream", "the images stay in their files"
    if choice != "auto":
        return choice, f"--data_path {choice}"
    if device.type != "cuda":
        return "device", "auto: the training device is the CPU"
    free, _ = torch.cuda.mem_get_info(device)
    fits = data.train.images.numel() < free // 4
    return ("device", "auto: within a quarter of the GPU's free memory") if fits else (
        "loader", "auto: more than a quarter of the GPU's free memory")


# A GPU step of an ImageNet network needs several decoding workers (docs/IMAGENET.md); beyond 16 per GPU
# the workers' memory grows and the gain does not.
MAX_STREAM_WORKERS = 16
LOADER_WORKERS = 2


def loader_workers(requested: int | None, path: str, processes_on_node: int) -> int:
    """``--num_workers``, or its default for ``path``: 2 on ``loader``; on ``stream`` this process's share of
    the CPU cores it may run on, less one for itself, between 1 and ``MAX_STREAM_WORKERS``."""
    if requested is not None:
        return requested
    if path != "stream":
        return LOADER_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_STREAM_WORKERS, cores // max(processes_on_node, 1) - 1))


def settle_data_path(data_cfg: DataSettings, data: dataload.DataBundle, device: torch.device,
                     dist: Dist) -> tuple[DataSettings, str]:
    """The run's data path and loader workers, the same on every rank, and the line that says which and why.

    Ranks must agree: the data paths draw differently from the shared data generator.
    """
    if dist.any_true(data.streamed) != dist.all_true(data.streamed):
        raise SharedUserError("some processes stream the images and some hold them in memory (their nodes differ "
                              "in memory); choose for all with --data_path stream, device or loader")
    path, why = resolve_data_path(data_cfg.data_path, data, device)
    if path != "stream" and dist.all_true(path == "device") != (path == "device"):
        path, why = "loader", "another process's GPU has not the room for the device path"
    workers = loader_workers(data_cfg.num_workers, path, dist.local_world_size)
    settled = replace(data_cfg, data_path=path, num_workers=workers)
    line = f"data: {data.info.name}, {data.held}; batches: {path} ({why})"
    if path != "device":
        line += (f"; loader workers per process: {workers}, prefetch {data_cfg.prefetch_factor}, "
                 f"{'persistent' if data_cfg.persistent_workers else 'restarted every epoch'}")
    return settled, line


def native_bfloat16() -> str | None:
    """The CPU's native bfloat16 instructions as PyTorch's cpuinfo reports them (the capabilities oneDNN
    dispatches on): ``AMX-BF16``, ``AVX512-BF16`` or None. Tests replace this function."""
    # get_capabilities is recent (torch 2.14 has it); without it nothing is assumed, and float32 stays.
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    # oneDNN's own cap on its instruction sets (ONEDNN_MAX_CPU_ISA) hides what it will not use.
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    capped = cap not in ("ALL", "DEFAULT", "")
    if caps.get("amx_bf16") and not (capped and "AMX" not in cap):
        return "AMX-BF16"
    if caps.get("avx512_bf16") and not (capped and "BF16" not in cap and "AMX" not in cap):
        return "AVX512-BF16"
    return None


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) of ``--precision auto`` on ``device``."""
    if device.type != "cpu":
        return "fp32", f"the default on {device.type}"
    native = native_bfloat16()
    if native == "AMX-BF16":
        return "bf16", "this CPU has AMX-BF16"
    if native:
        # Measured faster only with AMX so far (docs/SPEED.md); unmeasured kinds keep float32.
        return "fp32", f"this CPU has {native} but no AMX, where bfloat16 is not measured faster yet"
    return "fp32", "this CPU has no native bfloat16"


def resolve_speed(run: RunSettings, device: torch.device) -> RunSettings:
    """``run`` with ``auto`` precision and memory format resolved for ``device``, and the reason in words.

    channels-last goes with bfloat16 on a CPU: oneDNN's fast bfloat16 convolutions work on that layout.
    """
    precision, why = (run.precision, "--precision") if run.precision != "auto" else auto_precision(device)
    layout = run.memory_format
    if layout == "auto":
        layout = "channels_last" if precision == "bf16" and device.type == "cpu" else "contiguous"
    else:
        why += ", --memory_format"
    words = {"fp32": "float32", "bf16": "bf16"}[precision] + (" + channels-last" if layout == "channels_last" else "")
    return replace(run, precision=precision, memory_format=layout, speed_reason=f"{words}: {why}")
