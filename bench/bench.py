"""Time the training step and the epoch of every method against the floor, on generated data.

The floor of a distillation step is the work no implementation can avoid: the frozen teacher and its
heads run once without a graph, and the student trains one cross-entropy step. Every method's step is
reported as a multiple of that floor, measured in the same run. The methods are the registered training
types that declare a ``bench`` (``registry.TrainingType``), each built by it from ``parts.BenchParts``.
The authors' DIH step (teacher and heads with autograd on, back-propagated through, each head run twice,
one KD loss per cohort member) is rebuilt in ``authors_dih``, and only there, as the reference the
speed-up is measured against; its student gradients are checked against ours in every run.

All timed work goes through the toolkit's own code (``timing``): ``train_funcs.prepare_step``,
``forward_loss`` and ``train_step`` for steps, and ``train_funcs.Trainer(...).run()`` for whole epochs.
Medians over the interleaved repeats are reported, and ratios are medians of per-repeat ratios.

    python3 bench/bench.py --teacher res110 --student res8 --device cpu --batch_size 64 --out bench/results/cpu.json
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataload  # noqa: E402
from bench.authors_dih import authors_step, student_gradient_gap  # noqa: E402
from bench.parts import (AUTHORS_DIH, DIH, FINE_TUNE, FLOOR_STEP, SHAPES, bench_types,  # noqa: E402
                         build_methods)
from bench.variants import cross_ratios, forward_flops, peak_figures, peak_tasks, variant_name, variants  # noqa: E402
from bench.timing import (DATA_ONLY_RUN, DATA_PATH_RUN, generated_data, inference_task, make_ctx,  # noqa: E402
                          progress, time_epochs, time_interleaved, train_task, warm_up)
from dihkit.console.devices import configure_backends  # noqa: E402
from dihkit.files.atomic_files import atomic_write_text  # noqa: E402
from train_funcs import prepare_cohort  # noqa: E402
from models_repo import MODELS  # noqa: E402

# Epochs timed by default: the floor's step, the types the figures quote, and plain KD (the epoch table
# of docs/BENCHMARKS.md); any type with a ``bench`` can be asked for.
DEFAULT_EPOCH_METHODS = (FLOOR_STEP, FINE_TUNE, "kd", DIH)
# What the README promises; the benchmark reports whether this run met it.
# The floor: the frozen cohort's inference plus the student's own CE step, timed in the same repeat.
FLOOR_PARTS = ["cohort_inference", FLOOR_STEP]
TARGETS = {f"{DIH}_to_floor": ("<=", 1.10), f"{FINE_TUNE}_to_teacher_inference": ("<=", 1.10),
           "loader_to_device_epoch": (">=", 1.5)}


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's flags; the method choices are the registry's types with a ``bench``."""
    types = bench_types()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="res110", choices=list(MODELS))
    p.add_argument("--student", default="res8", choices=list(MODELS))
    p.add_argument("--dataset", default="cifar100", choices=list(SHAPES),
                   help="shape of the generated data (classes, image size, training-set size for CRD's memory)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="cpu or cuda:N")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as the console's")
    p.add_argument("--memory_format", default="auto", choices=["auto", "contiguous", "channels_last"],
                   help="as the console's")
    p.add_argument("--no_fold", action="store_true", help="leave the frozen cohort's batch norms unfolded")
    p.add_argument("--variants", nargs="+", type=variant_name, default=None, metavar="V",
                   help="time every step once per variant <fp32|bf16|auto>[_cl][_unfolded] in the same rounds, "
                        "replacing the three flags above (bench/variants.py); epochs take the first")
    p.add_argument("--peak", type=int, default=0, metavar="N",
                   help="also time an NxN matmul in float32 and bfloat16 and count the teacher's FLOPs (0: no)")
    p.add_argument("--compile", action="store_true", help="as the console's --compile (warm-up absorbs compilation)")
    p.add_argument("--methods", nargs="+", default=types, choices=types,
                   help="methods whose step is timed (the floor's parts and the teacher's inference always are)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per task before timing")
    p.add_argument("--steps", type=int, default=3, help="steps per task in each repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians over these)")
    p.add_argument("--epoch_methods", nargs="*", default=[m for m in DEFAULT_EPOCH_METHODS if m in types],
                   choices=types, help="methods timed over whole epochs by train_funcs.Trainer (none: skip)")
    p.add_argument("--epoch_images", type=int, default=1280, help="generated training images of a method epoch")
    p.add_argument("--loader_images", type=int, default=5000,
                   help="generated training images of the res8-style CE epoch timed on both data paths")
    p.add_argument("--epoch_repeats", type=int, default=3, help="interleaved repeats of the epochs")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of the loader path")
    p.add_argument("--test_images", type=int, default=256, help="generated test images (each epoch evaluates them)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch (0: torch's default); on a shared, loaded machine 1 avoids OpenMP "
                        "threads waiting for each other, which can be ten times slower")
    p.add_argument("--out", default=None, help="write the results as JSON here (e.g. bench/results/<name>.json)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "steps", "repeats", "epoch_images", "loader_images", "epoch_repeats", "test_images"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.warmup < 0 or args.num_workers < 0 or args.threads < 0 or args.peak < 0:
        p.error("--warmup, --num_workers, --threads and --peak must not be negative")
    missing = [m for m in args.epoch_methods if m not in args.methods and m != FLOOR_STEP]
    if missing:
        p.error(f"--epoch_methods {' '.join(missing)} must also be in --methods")
    return args


# ----------------------------------------------------------------------------- report

def paired_ratio(times: dict, numerator: str, denominator: list[str]) -> dict:
    """Median over repeats of ``numerator`` / sum of ``denominator`` timed in the same repeat."""
    per_repeat = [n / sum(parts) for n, *parts in zip(times[numerator], *(times[d] for d in denominator))]
    return {"median": statistics.median(per_repeat), "per_repeat": per_repeat,
            "of": f"{numerator} / ({' + '.join(denominator)})"}


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def check_targets(ratios: dict) -> dict:
    """Each target with this run's value and whether it was met."""
    out = {}
    for key, (op, limit) in TARGETS.items():
        if key in ratios:
            value = ratios[key]["median"]
            met = value <= limit if op == "<=" else value >= limit
            out[key] = {"value": value, "limit": f"{op} {limit}", "met": met}
    return out


def print_report(result: dict) -> None:
    """The table of step times, epoch times, ratios and targets."""
    s = result["settings"]
    print(f"\n{s['teacher']} -> {s['student']}, {s['dataset']}-shaped data, batch {s['batch_size']}, "
          f"device {s['device']} (compile {s['compile']}); "
          f"load average {result['load_average']['min']:.1f}-{result['load_average']['max']:.1f}")
    for name, reason in result["speed"].items():
        print(f"  {name}: {reason}" + (", batch norms unfolded" if name.endswith("_unfolded") or s["no_fold"] else ""))
    print(f"\n{'step':<30}{'median ms':>11}{'images/s':>10}{'x floor':>9}   memory")
    for name, m in result["steps"].items():
        mem = ", ".join(f"{k} {v:.0f}" for k, v in m["memory"].items())
        floor = result["floors_s"].get(name.rpartition(":")[0] + ":" if ":" in name else "")
        times_floor = f"{m['median_s'] / floor:>9.2f}" if floor else " " * 9
        print(f"{name:<30}{1000 * m['median_s']:>11.1f}{m['images_per_s']:>10.0f}{times_floor}   {mem}")
    if result["epochs"]:
        print(f"\n{'epoch (Trainer)':<22}{'median s':>11}{'images/s':>10}{'images':>9}")
        for name, m in result["epochs"].items():
            print(f"{name:<22}{m['median_s']:>11.2f}{m['images_per_s']:>10.0f}{m['images']:>9}")
    print("\nratios (median of per-repeat ratios)")
    for name, r in result["ratios"].items():
        print(f"  {name:<50}{r['median']:>7.3f}   {r['of']}")
    for name, t in result["targets"].items():
        print(f"  target {name:<31}{t['value']:>7.3f}   {t['limit']}: {'met' if t['met'] else 'NOT met'}")
    if "student_grad_max_abs_diff" in result:
        print(f"  student gradients, ours vs the authors'-style DIH step: max |diff| "
              f"{result['student_grad_max_abs_diff']:.2e}")
    for name, value in result.get("peak", {}).items():
        print(f"  {name:<50}{value:>10.4g}")
    if result["skipped"]:
        print(f"  skipped (teacher and student differ in stage count): {', '.join(result['skipped'])}")


# ----------------------------------------------------------------------------- run

def variant_tasks(opts, device: torch.device, data, batches: list, prefix: str, authors) -> dict:
    """One variant's timed tasks, named ``prefix + task``: the frozen inferences, every method's step (and the
    authors' DIH step when ``authors`` builds it), with their methods, contexts and skipped types."""
    methods, settings, cohorts, skipped = build_methods(opts, device, authors)
    ctxs = {name: make_ctx(cfg, device, data, Path("unused")) for name, cfg in settings.items()}
    floor_ctx = ctxs[FLOOR_STEP]
    for cohort in cohorts.values():
        prepare_cohort(cohort, floor_ctx)
    tasks = {"teacher_inference": inference_task(cohorts["teacher"].features, floor_ctx, batches),
             "cohort_inference": inference_task(cohorts["teacher_and_heads"], floor_ctx, batches)}
    tasks.update({name: train_task(method, ctxs[name], batches) for name, method in methods.items()})
    return {"tasks": {prefix + name: task for name, task in tasks.items()}, "methods": methods, "ctxs": ctxs,
            "skipped": skipped, "speed": floor_ctx.cfg.run.speed_reason, "teacher": cohorts["teacher"].teacher}


def time_steps(opts, device: torch.device, loads: list) -> dict:
    """Build every method of every variant, time its step and the frozen inference tasks; the figures of the steps."""
    data = generated_data(opts.dataset, 4 * opts.batch_size, opts.test_images)  # four fixed batches, cycled
    batches = list(dataload.train_batches(data.train, data.info, opts.batch_size, device,
                                          torch.Generator().manual_seed(0)))
    # The authors' step is the single run's reference; a comparison of variants leaves it out (its cost).
    built = {prefix: variant_tasks(vopts, device, data, batches, prefix, None if opts.variants else authors_step)
             for prefix, vopts in variants(opts)}
    first = next(iter(built.values()))
    configure_backends(first["ctxs"][FLOOR_STEP].cfg.run.deterministic)
    tasks = {name: task for b in built.values() for name, task in b["tasks"].items()}
    if opts.peak:
        tasks.update(peak_tasks(opts.peak, device))
    progress(f"warming up {len(tasks)} tasks")
    memory = warm_up(tasks, opts.warmup, device)
    times = time_interleaved(tasks, opts.steps, opts.repeats, device, loads)
    steps = {name: {"median_s": statistics.median(ts), "times_s": ts,
                    "images_per_s": opts.batch_size / statistics.median(ts), "memory": memory[name]}
             for name, ts in times.items()}
    out = {"methods": first["methods"], "times": times, "steps": steps, "skipped": first["skipped"],
           "speed": {prefix.rstrip(":") or "run": b["speed"] for prefix, b in built.items()},
           "prefixes": list(built)}
    if opts.peak:
        x = batches[0][0][:opts.batch_size]
        out["peak"] = peak_figures(steps, list(built), opts.peak, forward_flops(first["teacher"], x))
    if DIH in first["methods"] and AUTHORS_DIH in first["methods"]:
        out["student_grad_max_abs_diff"] = student_gradient_gap(first["methods"][DIH], first["methods"][AUTHORS_DIH],
                                                                batches[0], first["ctxs"][DIH])
    return out


def step_ratios(times: dict, methods: dict, prefix: str = "") -> dict:
    """Every method's step against the floor, and the figures of the fine-tune and DIH steps, of the variant
    whose tasks are named ``prefix + task``."""
    def ratio(numerator: str, denominator: list) -> dict:
        return paired_ratio(times, prefix + numerator, [prefix + d for d in denominator])
    ratios = {f"{prefix}{name}_to_floor": ratio(name, FLOOR_PARTS) for name in methods}
    if FINE_TUNE in methods:
        ratios[f"{prefix}{FINE_TUNE}_to_teacher_inference"] = ratio(FINE_TUNE, ["teacher_inference"])
    if AUTHORS_DIH in methods:
        ratios[f"{prefix}{AUTHORS_DIH}_to_{DIH}"] = ratio(AUTHORS_DIH, [DIH])
    return ratios


def epoch_figures(opts, methods: dict, loads: list, ratios: dict) -> dict:
    """The timed epochs (``--epoch_methods``); adds the data-path ratios to ``ratios``."""
    opts = argparse.Namespace(**{**vars(opts), "epoch_methods": [m for m in opts.epoch_methods if m in methods]})
    if not opts.epoch_methods:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        epochs = time_epochs(opts, methods, Path(tmp), loads)
    if FLOOR_STEP in opts.epoch_methods:
        epoch_times = {key: e["times_s"] for key, e in epochs.items()}
        for run_name, ratio in ((DATA_PATH_RUN, "loader_to_device_epoch"),
                                (DATA_ONLY_RUN, "loader_to_device_data_only")):
            ratios[ratio] = paired_ratio(epoch_times, f"{run_name}/loader", [f"{run_name}/device"])
    return epochs


def run(opts) -> dict:
    """Build everything, time it, and return the result record."""
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    loads = [os.getloadavg()[0]]
    started = datetime.datetime.now(datetime.timezone.utc)
    torch.manual_seed(0)
    timed = time_steps(opts, device, loads)
    steps, methods, prefixes = timed["steps"], timed["methods"], timed["prefixes"]
    ratios = {key: r for prefix in prefixes for key, r in step_ratios(timed["times"], methods, prefix).items()}
    ratios.update(cross_ratios(timed["times"], prefixes, paired_ratio) if opts.variants else {})
    floors = {prefix: sum(steps[prefix + p]["median_s"] for p in FLOOR_PARTS) for prefix in prefixes}
    result = {"settings": {k: v for k, v in vars(opts).items() if k != "out"}, "command": " ".join(sys.argv),
              "date": started.isoformat(timespec="seconds"), "machine": machine(), "speed": timed["speed"],
              "steps": steps, "floor_s": floors[prefixes[0]], "floors_s": floors, "floor": " + ".join(FLOOR_PARTS),
              "skipped": timed["skipped"]}
    for key in ("student_grad_max_abs_diff", "peak"):
        if key in timed:
            result[key] = timed[key]
    result["epochs"] = epoch_figures(opts, methods, loads, ratios)
    # The method's recipe: 200 epochs over the dataset's training set (50,000 images for CIFAR-100).
    dih_rate = (result["epochs"].get(f"{DIH}/device") or steps.get(prefixes[0] + DIH) or {}).get("images_per_s")
    if dih_rate:
        result["projected_dih_200_epochs_hours"] = 200 * SHAPES[opts.dataset][2] / dih_rate / 3600
    loads.append(os.getloadavg()[0])
    result.update(ratios=ratios, targets=check_targets(ratios),
                  load_average={"samples_1min": loads, "min": min(loads), "max": max(loads),
                                "median": statistics.median(loads)})
    return result


def command_line(argv, parse, measure, report) -> int:
    """A bench's command line: ``parse`` the flags, ``measure``, ``report`` the record, write it as JSON to ``--out``."""
    opts = parse(argv)
    result = measure(opts)
    report(result)
    if opts.out:
        out = Path(opts.out)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


def main(argv=None) -> int:
    """Parse, run, print, and write the JSON."""
    return command_line(argv, parse_args, run, print_report)


if __name__ == "__main__":
    sys.exit(main())
