"""Time one frozen teacher's inference four ways, interleaved: eager, eager folded, torch.compile of the folded
model, and TorchScript frozen and optimised for inference (oneDNN's fused convolutions) of the folded model.

A probe for what could bring the frozen cohort nearer the arithmetic peak; the toolkit runs the first two
(the cohort is folded; ``--compile`` compiles the whole training step, the cohort's pass included).

    python3 bench/frozen_inference.py --arch res110 --batch_size 64 --repeats 5
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dih_utils import freeze  # noqa: E402
from dihkit.runs.folding import folded  # noqa: E402
from models_repo import MODELS, build_model  # noqa: E402


def variants(arch: str, x: torch.Tensor) -> dict:
    """Name -> (forward callable, seconds it took to prepare), for the four ways of running ``arch``."""
    model = freeze(build_model(arch, 100))
    fast, _ = folded(model)
    out = {"eager": (model, 0.0), "eager_folded": (fast, 0.0)}
    for name, make in (("compiled_folded", lambda: torch.compile(fast)),
                       ("script_frozen_folded", lambda: torch.jit.optimize_for_inference(
                           torch.jit.freeze(torch.jit.trace(fast, x))))):
        start = time.perf_counter()
        fn = make()
        fn(x)  # compilation happens at the first call
        out[name] = (fn, time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    """Time the variants over interleaved repeats and print each one's median and speed-up over eager."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="res110", choices=list(MODELS))
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(opts.batch_size, 3, 32, 32)
    times, loads = {}, []
    with torch.no_grad():
        built = variants(opts.arch, x)
        reference = built["eager"][0](x)
        times = {name: [] for name in built}
        for r in range(opts.repeats):
            loads.append(os.getloadavg()[0])
            for name in list(built) if r % 2 == 0 else list(built)[::-1]:
                start = time.perf_counter()
                for _ in range(opts.steps):
                    built[name][0](x)
                times[name].append((time.perf_counter() - start) / opts.steps)
        gaps = {name: ((fn(x) - reference).abs().max() / reference.abs().max()).item() for name, (fn, _) in built.items()}
    print(f"{opts.arch}, batch {opts.batch_size}, one thread, load average {min(loads):.1f}-{max(loads):.1f}")
    for name, ts in times.items():
        speedup = statistics.median(e / t for e, t in zip(times["eager"], ts))
        print(f"{name:<22} {1000 * statistics.median(ts):8.1f} ms  x{speedup:.2f} over eager  "
              f"prepared in {built[name][1]:.0f} s  max relative gap {gaps[name]:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
