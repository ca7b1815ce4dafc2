"""Which device a run trains on, how its backends behave, and where its batches are made."""
import os
import sys

import torch

import dataload
from dihkit.foundations.errors import UserError


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


def resolve_data_path(choice: str, data: dataload.DataBundle, device: torch.device) -> str:
    """``auto`` becomes ``device`` when the training images fit comfortably in the device's memory."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if data.train.images.numel() < free // 4 else "loader"
