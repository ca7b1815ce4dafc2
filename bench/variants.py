"""Speed variants timed in one bench run, and the arithmetic peak the frozen teacher is compared with.

``--variants fp32 bf16_cl auto ...`` builds every timed task once per variant, named ``<variant>:<task>``,
and interleaves them all in the same rounds, so the ratios between variants come from one run under one
load. A variant's name is ``<precision>[_cl][_unfolded]``: precision ``fp32``, ``bf16`` or ``auto`` (the
console's default for the device), ``_cl`` channels-last (otherwise contiguous; ``auto`` alone takes the
console's automatic memory format too), ``_unfolded`` the frozen cohort's batch norms left unfolded.

``--peak N`` also times an N x N matmul in float32 and in bfloat16 (one call, 2 N^3 floating-point operations)
and counts the teacher's forward with torch's ``FlopCounterMode``, so the teacher's GFLOP/s can be set
against the matmul's, measured in the same rounds.
"""
import argparse
import re

import torch
from torch.utils.flop_counter import FlopCounterMode

VARIANT = re.compile(r"^(fp32|bf16|auto)(_cl)?(_unfolded)?$")
PEAK_DTYPES = {"matmul_fp32": torch.float32, "matmul_bf16": torch.bfloat16}
# The tasks compared across variants (speed-up of each variant over the first one).
COMPARED = ("teacher_inference", "cohort_inference", "ce", "dih")


def variant_name(text: str) -> str:
    """``text`` if it names a variant (argparse type)."""
    if not VARIANT.match(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not <fp32|bf16|auto>[_cl][_unfolded]")
    return text


def variant_opts(opts, name: str) -> argparse.Namespace:
    """The bench's options with the precision, memory format and folding of the variant ``name``."""
    precision, cl, unfolded = VARIANT.match(name).groups()
    layout = "channels_last" if cl else "auto" if precision == "auto" else "contiguous"
    return argparse.Namespace(**{**vars(opts), "precision": precision, "memory_format": layout,
                                 "no_fold": bool(unfolded)})


def variants(opts) -> list[tuple[str, argparse.Namespace]]:
    """(task-name prefix, options) per timed variant; without ``--variants``, the run's own flags unprefixed."""
    if not opts.variants:
        return [("", opts)]
    return [(f"{name}:", variant_opts(opts, name)) for name in opts.variants]


def peak_tasks(size: int, device: torch.device) -> dict:
    """One ``size`` x ``size`` matmul per call, per dtype of ``PEAK_DTYPES``."""
    tasks = {}
    for name, dtype in PEAK_DTYPES.items():
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
        tasks[name] = lambda a=a, b=b: torch.mm(a, b)
    return tasks


def forward_flops(model, x: torch.Tensor) -> int:
    """Floating-point operations of one forward of ``model`` on ``x`` (a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def peak_figures(steps: dict, prefixes: list, size: int, teacher_flops: int) -> dict:
    """GFLOP/s of each matmul and of each variant's teacher inference (``steps``: median seconds per task)."""
    out = {"teacher_gflop_per_batch": teacher_flops / 1e9, "matmul_size": size}
    for name in PEAK_DTYPES:
        out[f"{name}_gflop_s"] = 2 * size ** 3 / steps[name]["median_s"] / 1e9
    for prefix in prefixes:
        out[f"{prefix}teacher_inference_gflop_s"] = teacher_flops / steps[f"{prefix}teacher_inference"]["median_s"] / 1e9
    return out


def cross_ratios(times: dict, prefixes: list, paired_ratio) -> dict:
    """Each later variant's speed-up over the first on the compared tasks: first's time / its time, per round."""
    base, out = prefixes[0], {}
    for prefix in prefixes[1:]:
        for task in COMPARED:
            if f"{base}{task}" in times and f"{prefix}{task}" in times:
                ratio = paired_ratio(times, f"{base}{task}", [f"{prefix}{task}"])
                out[f"{prefix}{task}_speedup_over_{base.rstrip(':')}"] = ratio
    return out
