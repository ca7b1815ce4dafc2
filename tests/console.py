"""Running the console from tests: in-process (fast) or as a subprocess (signals, exit codes)."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import final_test

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete recipe: generated data, small models, one epoch on CPU.
TINY = ["--dataset", "synthetic", "--train_subset", "600", "--epochs", "1", "--schedule", "1", "--seed", "3",
        "--gpu_id", "cpu", "--batch_size", "64", "--teacher", "res14", "--student", "res8"]


def run_inprocess(args, capsys=None) -> int:
    """Call the console's ``main`` with ``args``; returns the exit code (SystemExit included)."""
    try:
        return final_test.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def run_subprocess(args, cwd, timeout=600, script="final_test.py") -> subprocess.CompletedProcess:
    """Run a console script of the repo in a fresh Python process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def make_ctx(argv, data=None, seed: int = 0, out=None, device: str = "cpu"):
    """A RunContext on ``device`` whose settings are the console's for ``argv`` (data on the device path)."""
    import dataclasses

    import torch

    from dihkit.runs.distributed import Dist
    from dihkit.runs.run_context import RunContext
    from dihkit.console.devices import resolve_speed
    cfg = final_test.make_settings(final_test.build_parser().parse_args([str(a) for a in ["--gpu_id", "cpu", *argv]]))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_path="device"),
                              run=resolve_speed(cfg.run, torch.device(device)))
    return RunContext(cfg, torch.device(device), data, Dist(), seed, out)


@contextlib.contextmanager
def data_loaded_once(test_images: int | None = None):
    """Within the block, each dataset is generated or read once (the in-process runs of a module share it),
    and, with ``test_images``, evaluated on its first test images only: evaluation dominates one-epoch runs."""
    import dataclasses

    import pytest

    import dataload
    real, loaded = dataload.load_data, {}

    def load_data(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            data = real(*args, **kwargs)
            if test_images is not None:
                data = dataclasses.replace(data, test=dataload.Split(data.test.images[:test_images],
                                                                     data.test.labels[:test_images]))
            loaded[key] = data
        return loaded[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataload, "load_data", load_data)
        yield
