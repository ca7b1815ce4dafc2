"""Time evaluation as the trainer runs it (``evaluate_outputs``) in float32 and under bfloat16 autocast, interleaved.

The cost of ``--eval_precision fp32`` (the default) against ``bf16`` for a run that trains in bfloat16: the
same models and generated test images, the memory format such a run uses on a CPU (channels-last), medians
over interleaved repeats. Where bfloat16 is emulated (no AVX512-BF16 or AMX) float32 is the faster of the two.

    python3 bench/eval_precision.py --arch res110 res8 --images 2000 --repeats 5 --threads 1 --out bench/results/cpu_eval_precision.json
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataload  # noqa: E402
import final_test  # noqa: E402
from dih_utils import freeze  # noqa: E402
from dihkit.files.atomic_files import atomic_write_json  # noqa: E402
from dihkit.console.devices import resolve_speed  # noqa: E402
from dihkit.runs.distributed import Dist  # noqa: E402
from dihkit.runs.evaluation import evaluate_outputs  # noqa: E402
from dihkit.runs.run_context import RunContext  # noqa: E402
from models_repo import MODELS, build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The bench's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["res110", "res8"], choices=list(MODELS))
    p.add_argument("--images", type=int, default=2000, help="generated 32x32 test images")
    p.add_argument("--batch_size", type=int, default=64, help="the run's --batch_size (evaluation uses >= 256)")
    p.add_argument("--memory_format", default="channels_last", choices=["contiguous", "channels_last"])
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians over these)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def contexts(opts, data) -> dict:
    """A CPU run context per evaluation precision, both training in bfloat16 with the chosen memory format."""
    cpu, out = torch.device("cpu"), {}
    for precision in ("fp32", "bf16"):
        argv = ["--gpu_id", "cpu", "--precision", "bf16", "--memory_format", opts.memory_format, "--batch_size",
                str(opts.batch_size), "--eval_precision", precision]
        cfg = final_test.make_settings(final_test.build_parser().parse_args(argv))
        cfg = replace(cfg, run=resolve_speed(cfg.run, cpu))
        out[precision] = RunContext(cfg, cpu, data, Dist(), 0, None)
    return out


def run(opts) -> dict:
    """Time every (architecture, precision) ``repeats`` times, interleaved; medians and the fp32/bf16 ratio."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    g = torch.Generator().manual_seed(0)
    split = dataload.Split(torch.randint(0, 256, (opts.images, 3, 32, 32), generator=g, dtype=torch.uint8),
                           torch.randint(0, 100, (opts.images,), generator=g))
    data = dataload.DataBundle(dataload.known_info("cifar100"), split, None, split)
    ctxs, loads, times = contexts(opts, data), [os.getloadavg()[0]], {}
    layout = torch.channels_last if opts.memory_format == "channels_last" else torch.contiguous_format
    models = {a: freeze(build_model(a, 100)).to(memory_format=layout) for a in opts.arch}
    for _ in range(opts.repeats):
        for arch, model in models.items():
            for precision, ctx in ctxs.items():
                start = time.perf_counter()
                evaluate_outputs(lambda x: {arch: model(x)}, split, ctx)
                times.setdefault(f"{arch}/{precision}", []).append(time.perf_counter() - start)
    loads.append(os.getloadavg()[0])
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"settings": {k: v for k, v in vars(opts).items() if k != "out"}, "command": " ".join(sys.argv),
            "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "times_s": times,
            "median_s": medians,
            "fp32_over_bf16": {a: medians[f"{a}/fp32"] / medians[f"{a}/bf16"] for a in opts.arch},
            "seconds_per_10k_images": {k: v * 10000 / opts.images for k, v in medians.items()},
            "load_average_1min": loads}


def main(argv=None) -> int:
    """Parse, time, print, and write the JSON."""
    opts = parse_args(argv)
    result = run(opts)
    for key, seconds in result["median_s"].items():
        print(f"{key:<16} {seconds:8.3f} s for {opts.images} images ({result['seconds_per_10k_images'][key]:.1f} s "
              f"per 10,000)")
    for arch, ratio in result["fp32_over_bf16"].items():
        print(f"{arch}: float32 evaluation takes {ratio:.2f}x the bfloat16 one")
    print(f"CPU: {result['cpu']}; load average {result['load_average_1min']}")
    if opts.out:
        atomic_write_json(opts.out, result)
        print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
