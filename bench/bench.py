"""Time the training step and the epoch of every method against the floor, on generated data.

The floor of a distillation step is the work no implementation can avoid: the frozen teacher and its
heads run once without a graph, and the student trains one cross-entropy step. Every method's step is
reported as a multiple of that floor, measured in the same run. The authors' DIH step (teacher and heads
with autograd on, back-propagated through, each head run twice) is rebuilt here, and only here, as the
reference the speed-up is measured against.

All timed work goes through the toolkit's own code: ``train_funcs.prepare_step`` (device, memory format,
compile), ``forward_loss`` (channels-last input, autocast) and ``train_step`` (backward, optimizer,
device-side metrics) for steps, and ``train_funcs.fit`` itself for whole epochs. Tasks are interleaved:
every repeat times each task once (the order reversed on odd repeats), so a change of machine load hits
all of them alike; medians over the repeats are reported, and ratios are medians of per-repeat ratios.

    python3 bench/bench.py --teacher res110 --student res8 --device cpu --batch_size 64 --out bench/results/cpu.json
"""
import argparse
import contextlib
import copy
import datetime
import io
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataload  # noqa: E402
import final_test  # noqa: E402
import train_funcs  # noqa: E402
from CRD.crd import CRDMethod, negatives_available  # noqa: E402
from dih_utils import Cohort, build_heads, freeze, mount_shapes  # noqa: E402
from distributed import from_env  # noqa: E402
from feature_baselines import DEFAULT_BETA  # noqa: E402
from KD_Loss import dih_loss  # noqa: E402
from MHKD.mhkd import MHKDMethod, build_multi_heads  # noqa: E402
from models_repo import MODELS, build_model  # noqa: E402
from TOFD.tofd import TOFDMethod, build_aux, build_links, map_shapes  # noqa: E402
from train_at import AttentionTransfer  # noqa: E402
from train_fitnets import HintTraining, build_regressor, middle_stage  # noqa: E402

# (classes, image size, training images) of the datasets whose shape the generated data takes.
SHAPES = {"cifar10": (10, 32, 50_000), "cifar100": (100, 32, 50_000), "tiny-imagenet": (200, 64, 100_000)}
METHODS = ("ce", "fine_tune", "kd", "dih", "fitnets", "at", "crd", "tofd", "mhkd")
EPOCH_METHODS = ("ce", "fine_tune", "kd", "dih")
# What the README promises; the benchmark reports whether this run met it.
TARGETS = {"dih_to_floor": ("<=", 1.10), "fine_tune_to_teacher_inference": ("<=", 1.10),
           "loader_to_device_epoch": (">=", 1.5)}
MIB = 2 ** 20
# The student's CE epoch timed on both data paths (over --loader_images images).
DATA_PATH_RUN = "ce_data_path"
# The same data drawn on both paths with nothing trained: the cost of the data path alone.
DATA_ONLY_RUN = "data_only"


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="res110", choices=list(MODELS))
    p.add_argument("--student", default="res8", choices=list(MODELS))
    p.add_argument("--dataset", default="cifar100", choices=list(SHAPES),
                   help="shape of the generated data (classes, image size, training-set size for CRD's memory)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="cpu or cuda:N")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--amp", action="store_true", help="as the console's --amp")
    p.add_argument("--channels_last", action="store_true", help="as the console's --channels_last")
    p.add_argument("--compile", action="store_true", help="as the console's --compile (warm-up absorbs compilation)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods whose step is timed (the floor's parts and the teacher's inference always are)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per task before timing")
    p.add_argument("--steps", type=int, default=3, help="steps per task in each repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians over these)")
    p.add_argument("--epoch_methods", nargs="*", default=list(EPOCH_METHODS), choices=EPOCH_METHODS,
                   help="methods timed over whole epochs by train_funcs.fit (none: skip)")
    p.add_argument("--epoch_images", type=int, default=1280, help="generated training images of a method epoch")
    p.add_argument("--loader_images", type=int, default=5000,
                   help="generated training images of the res8-style CE epoch timed on both data paths")
    p.add_argument("--epoch_repeats", type=int, default=3, help="interleaved repeats of the epochs")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of the loader path")
    p.add_argument("--test_images", type=int, default=256, help="generated test images (fit evaluates them)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch (0: torch's default); on a shared, loaded machine 1 avoids OpenMP "
                        "threads waiting for each other, which can be ten times slower")
    p.add_argument("--out", default=None, help="write the results as JSON here (e.g. bench/results/<name>.json)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "steps", "repeats", "epoch_images", "loader_images", "epoch_repeats", "test_images"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.warmup < 0 or args.num_workers < 0 or args.threads < 0:
        p.error("--warmup, --num_workers and --threads must not be negative")
    missing = sorted(set(args.epoch_methods) - set(args.methods) - {"ce"})
    if missing:
        p.error(f"--epoch_methods {' '.join(missing)} must also be in --methods")
    return args


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


def make_ctx(opts, data: dataload.DataBundle, training_type: str, data_path: str, out: Path) -> train_funcs.RunContext:
    """A run context whose arguments are the console's, parsed from the benchmark's settings."""
    argv = ["--training_type", training_type, "--teacher", opts.teacher, "--student", opts.student,
            "--batch_size", str(opts.batch_size), "--gpu_id", opts.device, "--epochs", "1", "--schedule", "1",
            "--seed", "0", "--num_workers", str(opts.num_workers), "--data_path", data_path]
    argv += [f"--{flag}" for flag in ("amp", "channels_last", "compile") if getattr(opts, flag)]
    args = final_test.build_parser().parse_args(argv)
    return train_funcs.RunContext(args, torch.device(opts.device), data, from_env(), 0, out)


def progress(message: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously to the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- methods

class OriginalDIH(train_funcs.StudentMethod):
    """The authors' DIH step, the benchmark's reference only: teacher and heads run with autograd on, the loss
    back-propagates through them (their gradients accumulate, unused), and each head runs twice.

    The loss is this toolkit's ``dih_loss`` on the second head pass, so the student's gradients equal those of
    ``Distillation`` (the benchmark checks it); only the wasted work differs.
    """

    def __init__(self, student, teacher, heads, alpha: float, temperature: float):
        super().__init__(student, {})
        # Copies that require gradients, in a plain list: not trained, not moved by ``.to``, kept in eval mode.
        self.graph = [copy.deepcopy(m).requires_grad_(True) for m in (teacher, heads)]
        self.alpha, self.temperature = alpha, temperature

    def forward(self, x, y, idx):
        """The cohort's logits through a graph, each head twice, then the summed KD loss."""
        teacher, heads = self.graph
        logits = self.student(x)
        t_logits, feats, _ = teacher(x, features=True)
        for head, f in zip(heads, feats):
            head(f)
        cohort = [t_logits] + [head(f) for head, f in zip(heads, feats)]
        return dih_loss(logits, cohort, y, self.alpha, self.temperature), logits


def same_stages(opts) -> bool:
    """Whether teacher and student have the stage count the stage-by-stage baselines (AT, TOFD, MHKD) need."""
    return build_model(opts.teacher, 10).num_stages == build_model(opts.student, 10).num_stages


def build_methods(opts, args, device: torch.device) -> tuple[dict, dict, list]:
    """Every timed training method (name -> Method), the frozen cohorts (name -> Cohort), and skipped methods.

    Hyper-parameters are the console's defaults (``args``). Models are randomly initialised: weights do not
    change the cost. Frozen models go to the device (and to channels-last) as the console's loaders put them
    there; ``prepare_step`` does the rest.
    """
    alpha, temperature = args.kd_alpha, args.kd_temperature
    classes, size, n_dataset = SHAPES[opts.dataset]

    def frozen(module):
        module.to(device)
        if opts.channels_last:
            module.to(memory_format=torch.channels_last)
        return freeze(module)

    teacher = frozen(build_model(opts.teacher, classes))
    heads = frozen(build_heads(teacher, classes, size))
    cohorts = {"teacher": Cohort(teacher), "teacher_and_heads": Cohort(teacher, heads)}

    def student():
        return build_model(opts.student, classes).to(device)

    makers = {
        "ce": lambda: train_funcs.CrossEntropy(student(), {}),
        "fine_tune": lambda: train_funcs.HeadTuning(teacher, build_heads(teacher, classes, size), {}),
        "kd": lambda: train_funcs.Distillation(student(), {}, cohorts["teacher"], alpha, temperature),
        "dih": lambda: train_funcs.Distillation(student(), {}, cohorts["teacher_and_heads"], alpha, temperature),
        "dih_original": lambda: OriginalDIH(student(), teacher, heads, alpha, temperature),
        "fitnets": lambda: fitnets_stage1(student(), teacher, size),
        "at": lambda: AttentionTransfer(student(), {}, cohorts["teacher"], args.at_beta, args.at_p, args.at_kd_alpha,
                                        temperature),
        "crd": lambda: crd(args, student(), teacher, classes, n_dataset, device),
        "tofd": lambda: tofd(args, student(), teacher, classes, size, frozen),
        "mhkd": lambda: mhkd(args, student(), teacher, classes, size, frozen),
    }
    wanted = ["ce"] + [m for m in opts.methods if m != "ce"] + (["dih_original"] if "dih" in opts.methods else [])
    skipped = [m for m in wanted if m in ("at", "tofd", "mhkd") and not same_stages(opts)]
    methods = {name: makers[name]() for name in wanted if name not in skipped}
    return methods, cohorts, skipped


def fitnets_stage1(student, teacher, size: int) -> HintTraining:
    """FitNets' stage 1 on the middle stages (its stage 2 is ``kd``)."""
    hint, guided = middle_stage(teacher.num_stages), middle_stage(student.num_stages)
    regressor = build_regressor(mount_shapes(student, size)[guided], mount_shapes(teacher, size)[hint])
    return HintTraining(student, {}, teacher, regressor, hint, guided)


def crd(args, student, teacher, classes: int, n_dataset: int, device: torch.device) -> CRDMethod:
    """CRD with memory banks as large as the real training set's (the (B, N) scores scale with N)."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, classes, (n_dataset,), generator=g).to(device)
    nce_k = min(args.nce_k, negatives_available(labels))
    return CRDMethod(student, teacher, {}, labels, args.feat_dim, nce_k, args.nce_t, args.nce_m, args.kd_alpha,
                     DEFAULT_BETA["crd"], args.kd_temperature, torch.Generator(device).manual_seed(2))


def tofd(args, student, teacher, classes: int, size: int, frozen) -> TOFDMethod:
    """TOFD with fresh auxiliary classifiers on both sides and the links between their maps."""
    aux = build_aux(args.student, classes).to(next(student.parameters()).device)
    teacher_aux = frozen(build_aux(args.teacher, classes))
    links = build_links(map_shapes(student, aux, size), map_shapes(teacher, teacher_aux, size))
    return TOFDMethod(student, aux, links, {}, Cohort(teacher, teacher_aux), args.kd_alpha, DEFAULT_BETA["tofd"],
                      args.kd_temperature)


def mhkd(args, student, teacher, classes: int, size: int, frozen) -> MHKDMethod:
    """MHKD with fresh multi-layer heads on both sides (the teacher's frozen)."""
    heads = build_multi_heads(student, classes, size)
    teacher_heads = frozen(build_multi_heads(teacher, classes, size))
    return MHKDMethod(student, heads, {}, Cohort(teacher, teacher_heads), args.kd_alpha, DEFAULT_BETA["mhkd"],
                      args.kd_temperature)


# ----------------------------------------------------------------------------- timed tasks

def train_task(method: train_funcs.Method, ctx: train_funcs.RunContext, batches: list):
    """One training step of ``method`` per call, as ``fit`` runs it (fixed batches, cycled)."""
    step_fn = train_funcs.prepare_step(method, ctx)
    opt, _ = train_funcs.make_optimizer([p for p in method.parameters() if p.requires_grad],
                                        train_funcs.OptimConfig.from_args(ctx.args))
    sums = torch.zeros(3, device=ctx.device)
    cycle = itertools.cycle(batches)
    method.train()

    def step():
        x, y, idx = next(cycle)
        loss, logits = train_funcs.forward_loss(step_fn, x, y, idx, ctx)
        train_funcs.train_step(opt, loss, logits, y, sums)
    return step


def inference_task(fn, ctx: train_funcs.RunContext, batches: list):
    """One frozen forward ``fn(x)`` per call, with the run's input format and autocast."""
    cycle = itertools.cycle(batches)

    def step():
        x, _, _ = next(cycle)
        if ctx.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with train_funcs.autocast(ctx):
            fn(x)
    return step


def max_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def student_gradient_gap(ours, original, batch, ctx: train_funcs.RunContext) -> float:
    """Largest difference between the student's gradients from our DIH step and the original-style step."""
    original.student.load_state_dict(ours.student.state_dict())
    grads = []
    for method in (ours, original):
        method.zero_grad(set_to_none=True)
        loss, _ = train_funcs.forward_loss(method, *batch, ctx)
        loss.backward()
        grads.append([p.grad for p in method.student.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*grads))


def fit_epoch(opts, method, name: str, data_path: str, data: dataload.DataBundle, out: Path) -> float:
    """Training-loop seconds of one ``fit`` epoch (its ``epoch_time_s``: evaluation and checkpoints excluded)."""
    is_dir = name == "fine_tune"
    ctx = make_ctx(opts, data, "fine_tune" if is_dir else "ce", data_path, out if is_dir else out.with_suffix(".pth"))
    meta = {"arch": opts.student, "num_classes": data.info.num_classes, "dataset": data.info.name,
            "image_size": data.info.image_size, "seed": 0}
    paths = train_funcs.RunPaths.for_output(ctx.out, is_dir=is_dir)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        record = train_funcs.fit(method, ctx, paths, train_funcs.OptimConfig.from_args(ctx.args), name, meta)
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


def time_epochs(opts, methods: dict, tmp: Path, loads: list) -> dict:
    """Seconds of one epoch per run, interleaved over ``--epoch_repeats``.

    Each method trains one ``fit`` epoch on the device-resident path over ``--epoch_images`` images. Over
    ``--loader_images`` images, the student's CE epoch runs on both data paths, and so does the data path
    alone (batches drawn, nothing trained).
    """
    data = generated_data(opts.dataset, opts.epoch_images, opts.test_images)
    loader_data = generated_data(opts.dataset, opts.loader_images, opts.test_images, seed=1)
    runs = {f"{name}/device": (data, lambda r, name=name: fit_epoch(opts, methods[name], name, "device", data,
                                                                    tmp / f"{name}_{r}"))
            for name in opts.epoch_methods}
    if "ce" in opts.epoch_methods:
        for path in ("device", "loader"):
            runs[f"{DATA_PATH_RUN}/{path}"] = (loader_data, lambda r, path=path: fit_epoch(
                opts, methods["ce"], "ce", path, loader_data, tmp / f"{DATA_PATH_RUN}_{path}_{r}"))
            runs[f"{DATA_ONLY_RUN}/{path}"] = (loader_data, lambda r, path=path: data_epoch(opts, path, loader_data))
    times = {key: [] for key in runs}
    for r in range(opts.epoch_repeats):
        loads.append(os.getloadavg()[0])
        progress(f"epochs: repeat {r + 1}/{opts.epoch_repeats} (load average {loads[-1]:.1f})")
        for key in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[key].append(runs[key][1](r))
    return {key: {"median_s": statistics.median(ts), "times_s": ts, "images": len(runs[key][0].train),
                  "images_per_s": len(runs[key][0].train) / statistics.median(ts)} for key, ts in times.items()}


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
          f"device {s['device']}"
          f" (amp {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}); "
          f"load average {result['load_average']['min']:.1f}-{result['load_average']['max']:.1f}")
    floor = result["floor_s"]
    print(f"\n{'step':<22}{'median ms':>11}{'images/s':>10}{'x floor':>9}   memory")
    for name, m in result["steps"].items():
        mem = ", ".join(f"{k} {v:.0f}" for k, v in m["memory"].items())
        print(f"{name:<22}{1000 * m['median_s']:>11.1f}{m['images_per_s']:>10.0f}{m['median_s'] / floor:>9.2f}   {mem}")
    if result["epochs"]:
        print(f"\n{'epoch (fit)':<22}{'median s':>11}{'images/s':>10}{'images':>9}")
        for name, m in result["epochs"].items():
            print(f"{name:<22}{m['median_s']:>11.2f}{m['images_per_s']:>10.0f}{m['images']:>9}")
    print("\nratios (median of per-repeat ratios)")
    for name, r in result["ratios"].items():
        print(f"  {name:<38}{r['median']:>7.3f}   {r['of']}")
    for name, t in result["targets"].items():
        print(f"  target {name:<31}{t['value']:>7.3f}   {t['limit']}: {'met' if t['met'] else 'NOT met'}")
    if "student_grad_max_abs_diff" in result:
        print(f"  student gradients, ours vs original-style DIH: max |diff| {result['student_grad_max_abs_diff']:.2e}")
    if result["skipped"]:
        print(f"  skipped (teacher and student differ in stage count): {', '.join(result['skipped'])}")


def run(opts) -> dict:
    """Build everything, time it, and return the result record."""
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    loads = [os.getloadavg()[0]]
    started = datetime.datetime.now(datetime.timezone.utc)
    data = generated_data(opts.dataset, 4 * opts.batch_size, opts.test_images)  # four fixed batches, cycled
    ctx = make_ctx(opts, data, "dih", "device", Path("unused"))
    final_test.configure_backends(ctx.args)
    torch.manual_seed(0)
    batches = list(dataload.train_batches(data.train, data.info, opts.batch_size, device,
                                          torch.Generator().manual_seed(0)))
    methods, cohorts, skipped = build_methods(opts, ctx.args, device)
    tasks = {"teacher_inference": inference_task(cohorts["teacher"].features, ctx, batches),
             "cohort_inference": inference_task(cohorts["teacher_and_heads"], ctx, batches)}
    tasks.update({name: train_task(method, ctx, batches) for name, method in methods.items()})
    progress(f"warming up {len(tasks)} tasks")
    memory = warm_up(tasks, opts.warmup, device)
    times = time_interleaved(tasks, opts.steps, opts.repeats, device, loads)
    steps = {name: {"median_s": statistics.median(ts), "times_s": ts,
                    "images_per_s": opts.batch_size / statistics.median(ts), "memory": memory[name]}
             for name, ts in times.items()}
    floor_parts = ["cohort_inference", "ce"]
    ratios = {f"{name}_to_floor": paired_ratio(times, name, floor_parts) for name in methods}
    if "fine_tune" in methods:
        ratios["fine_tune_to_teacher_inference"] = paired_ratio(times, "fine_tune", ["teacher_inference"])
    if "dih" in methods:
        ratios["dih_original_to_dih"] = paired_ratio(times, "dih_original", ["dih"])
    result = {"settings": {k: v for k, v in vars(opts).items() if k != "out"}, "command": " ".join(sys.argv),
              "date": started.isoformat(timespec="seconds"), "machine": machine(), "steps": steps,
              "floor_s": sum(steps[p]["median_s"] for p in floor_parts), "floor": " + ".join(floor_parts),
              "skipped": skipped}
    if "dih" in methods:
        result["student_grad_max_abs_diff"] = student_gradient_gap(methods["dih"], methods["dih_original"],
                                                                   batches[0], ctx)
    result["epochs"] = {}
    if opts.epoch_methods:
        with tempfile.TemporaryDirectory() as tmp:
            result["epochs"] = time_epochs(opts, methods, Path(tmp), loads)
        if "ce" in opts.epoch_methods:
            epoch_times = {key: e["times_s"] for key, e in result["epochs"].items()}
            for run_name, ratio in ((DATA_PATH_RUN, "loader_to_device_epoch"),
                                    (DATA_ONLY_RUN, "loader_to_device_data_only")):
                ratios[ratio] = paired_ratio(epoch_times, f"{run_name}/loader", [f"{run_name}/device"])
    # The method's recipe: 200 epochs over the dataset's training set (50,000 images for CIFAR-100).
    dih_rate = (result["epochs"].get("dih/device") or steps.get("dih") or {}).get("images_per_s")
    if dih_rate:
        result["projected_dih_200_epochs_hours"] = 200 * SHAPES[opts.dataset][2] / dih_rate / 3600
    loads.append(os.getloadavg()[0])
    result.update(ratios=ratios, targets=check_targets(ratios),
                  load_average={"samples_1min": loads, "min": min(loads), "max": max(loads),
                                "median": statistics.median(loads)})
    return result


def main(argv=None) -> int:
    """Parse, run, print, and write the JSON."""
    opts = parse_args(argv)
    result = run(opts)
    print_report(result)
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
