"""The console: one argparse front end that dispatches ``--training_type`` to a training module.

Every mistake a user can make ends in one sentence on stderr and exit code 2, before training starts.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

import CRD
import dataload
import MHKD
import pipeline
import TOFD
import train_at
import train_dih
import train_fitnets
import train_funcs
import train_takd
import distributed
from distributed import from_env
from errors import UserError
from models_repo import MODELS

TRAINING_TYPES = {
    "ce": train_funcs.train_ce,
    "fine_tune": train_funcs.fine_tune,
    "kd": train_funcs.train_kd,
    "dih": train_dih.train_dih,
    "fitnets": train_fitnets.train_fitnets,
    "takd": train_takd.train_takd,
    "at": train_at.train_at,
    "crd": CRD.train_crd,
    "tofd": TOFD.train_tofd,
    "mhkd": MHKD.train_mhkd,
}
# Types that write a directory of heads rather than one model file.
DIRECTORY_OUTPUTS = {"fine_tune"}


def parse_bool(text: str) -> bool:
    """Parse True/False, 1/0, yes/no (any case); anything else is an error."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, 1/0 or yes/no, got '{text}'")


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        """Print one sentence and exit 2 (argparse would also print the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "final_test.py") -> Parser:
    """Every flag of the method's hyper-parameter table, with its default, and the toolkit's own."""
    p = Parser(prog=prog, description="Train teachers, heads and students for DIH and its baselines.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--training_type", default="dih", choices=sorted(TRAINING_TYPES) + ["pipeline", "test"],
                   help="what to train (test: evaluate --saved_path on the test split; pipeline: teacher, heads and "
                        "--methods over the seeds into one folder, README 'Sweeps, pipelines and reports')")
    p.add_argument("--student", default="res8", choices=list(MODELS), help="student architecture")
    p.add_argument("--teacher", default="res110", choices=list(MODELS),
                   help="teacher architecture (the model trained by --training_type ce)")
    p.add_argument("--dataset", default="cifar100", choices=dataload.DATASET_NAMES)
    p.add_argument("--data_dir", default="./data", help="where datasets are read from or downloaded to")
    p.add_argument("--val_size", type=int, default=0,
                   help="class-balanced validation images held out of the training set (0: none)")
    p.add_argument("--train_subset", type=int, default=0,
                   help="train on a class-balanced subset of this many training images (0: all)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=64, help="per process under torchrun")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", type=parse_bool, default=True, help="nesterov momentum (True/False)")
    p.add_argument("--schedule", type=int, nargs="+", default=[60, 120, 180], help="MultiStepLR milestones")
    p.add_argument("--schedule_gamma", type=float, default=0.1)
    p.add_argument("--kd_temperature", "--temperature", dest="kd_temperature", type=float, default=5.0)
    p.add_argument("--kd_alpha", "--alpha", dest="kd_alpha", type=float, default=0.1,
                   help="weight of the distillation term")
    p.add_argument("--seed", type=int, nargs="+", default=[30, 50, 67],
                   help="one run per seed; several seeds get _s<seed> output suffixes and a mean/std summary")
    p.add_argument("--gpu_id", default=None, help="cuda:N or cpu (default: cuda:0 if available, else cpu; cuda:<LOCAL_RANK> under torchrun)")
    p.add_argument("--num_workers", type=int, default=2, help="loader workers (--data_path loader only)")
    p.add_argument("--data_path", default="auto", choices=["auto", "device", "loader"],
                   help="device: whole dataset on the training device, augmented there; loader: torchvision "
                        "DataLoader; auto: device when it fits in memory")
    p.add_argument("--saved_path", default=None, help="trained teacher checkpoint (or the model to --test)")
    p.add_argument("--saved_intermediates_directory", default=None, help="heads written by fine_tune")
    p.add_argument("--path_to_save", default=None,
                   help="output model file (a directory for fine_tune); default runs/<type>_<model>.pth")
    p.add_argument("--summary", action="store_true", help="print the model with torchsummary and exit")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--nan_policy", default="stop", choices=["stop", "skip"],
                   help="on a non-finite loss: stop the run, or skip the batch and count it")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms, no cuDNN benchmarking (reproducible, slower)")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast on the training device, CUDA or CPU (losses in float32); on a CPU it is "
                        "faster only with native bfloat16 (AVX512-BF16, AMX), bench/bench.py --amp measures it")
    p.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format for the trained modules, the frozen teacher/heads and the input")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (needs a C compiler on CPU; the first batches compile)")
    g = p.add_argument_group("multi-GPU (torchrun)", "used when launched with torchrun (README, Multi-GPU)")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply --lr by the number of processes (the global batch is world size x --batch_size)")
    g.add_argument("--sync_bn", action="store_true",
                   help="SyncBatchNorm in the trained modules: batch statistics over all processes (CUDA only)")
    g.add_argument("--dist_timeout", type=float, default=1800.0,
                   help="seconds to wait for the other processes at the rendezvous and in any collective")
    g = p.add_argument_group("pipeline", "--training_type pipeline: --path_to_save is the pipeline's folder "
                             "(default runs/<dataset>_<teacher>_<student>); every other flag reaches every step")
    g.add_argument("--methods", nargs="+", default=list(pipeline.DEFAULT_METHODS),
                   choices=sorted(set(TRAINING_TYPES) - {"fine_tune"}),
                   help="the student methods to run over the seeds (ce: the student trained alone)")
    g.add_argument("--teacher_epochs", type=int, default=None, help="the teacher's epochs (default: --epochs)")
    g.add_argument("--teacher_schedule", type=int, nargs="+", default=None,
                   help="the teacher's MultiStepLR milestones (default: --schedule)")
    g = p.add_argument_group("fitnets", "FitNets stage 1 (hint regression); stage 2 uses the kd and main flags")
    g.add_argument("--epochs_fitnets_1", type=int, default=40, help="stage-1 epochs")
    g.add_argument("--lr_fitnets_1", type=float, default=0.1, help="stage-1 learning rate")
    g.add_argument("--wd_fitnets_1", type=float, default=5e-4, help="stage-1 weight decay")
    g.add_argument("--momentum_fitnets_1", type=float, default=0.9, help="stage-1 SGD momentum")
    g.add_argument("--nesterov_fitnets_1", type=parse_bool, default=True, help="stage-1 nesterov (True/False)")
    g.add_argument("--schedule_fitnets_1", type=int, nargs="*", default=None,
                   help="stage-1 MultiStepLR milestones; unset: 50%% and 75%% of --epochs_fitnets_1; "
                        "the flag with no value: constant lr")
    g.add_argument("--schedule_gamma_fitnets_1", type=float, default=0.1, help="stage-1 lr decay factor")
    g.add_argument("--hint_layer", type=int, default=None,
                   help="0-based teacher stage giving the hint; unset: the middle stage, (k-1)//2")
    g.add_argument("--guided_layer", type=int, default=None,
                   help="0-based student stage regressing the hint; unset: the middle stage, (k-1)//2")
    g = p.add_argument_group("takd", "teacher assistant knowledge distillation (both hops use the kd flags)")
    g.add_argument("--ta", default="res20", choices=list(MODELS),
                   help="teacher assistant: no more parameters than the teacher, no fewer than the student")
    g.add_argument("--saved_ta_path", default=None, help="an already trained assistant (skips the first hop)")
    g = p.add_argument_group("at", "attention transfer on the stage outputs")
    g.add_argument("--at_beta", type=float, default=1000.0, help="weight beta of the attention term (beta/2 * sum)")
    g.add_argument("--at_p", type=float, default=2.0, help="exponent p of the attention map mean_c |F|^p")
    g.add_argument("--at_kd_alpha", type=float, default=0.0,
                   help="weight of an added KD term for at (0: CE + attention only); --kd_alpha is not used by at")
    g = p.add_argument_group("crd, tofd, mhkd", "feature- and head-based baselines; --alpha and --temperature "
                             "are --kd_alpha and --kd_temperature (what each weights: README, Feature baselines)")
    g.add_argument("--beta", type=float, default=None,
                   help="crd: weight of the contrastive loss (default 0.8); tofd: weight of the links' "
                        "orthogonality loss (default 0.03); mhkd: weight of each head's KD loss (default 1.0)")
    g = p.add_argument_group("crd", "contrastive representation distillation")
    g.add_argument("--feat_dim", type=int, default=128, help="dimension of the contrastive embeddings")
    g.add_argument("--nce_k", type=int, default=16384,
                   help="negatives per sample (capped at the samples outside the largest class)")
    g.add_argument("--nce_t", type=float, default=0.07, help="NCE temperature")
    g.add_argument("--nce_m", type=float, default=0.5, help="momentum of the memory-bank update")
    g = p.add_argument_group("tofd", "task-oriented feature distillation")
    g.add_argument("--saved_tofd_directory", default=None,
                   help="the teacher's fine-tuned auxiliary classifiers to reuse; unset: fine-tune them first into "
                        "<output stem>_tofd_teacher_aux/")
    g = p.add_argument_group("mhkd", "multi-head knowledge distillation")
    g.add_argument("--saved_mhkd_directory", default=None,
                   help="the teacher's fine-tuned heads to reuse; unset: fine-tune them first into "
                        "<output stem>_mhkd_teacher_aux/")
    return p


def validate(args) -> None:
    """Check flag values that argparse cannot, before anything is loaded or written."""
    checks = [
        (args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.batch_size > 0, f"--batch_size must be positive, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.wd >= 0, f"--wd must not be negative, got {args.wd}"),
        (0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
        (0 <= args.kd_alpha <= 1, f"--kd_alpha/--alpha must be in [0, 1], got {args.kd_alpha}"),
        (args.kd_temperature > 0, f"--kd_temperature/--temperature must be positive, got {args.kd_temperature}"),
        (args.schedule_gamma > 0, f"--schedule_gamma must be positive, got {args.schedule_gamma}"),
        (args.val_size >= 0, f"--val_size must not be negative, got {args.val_size}"),
        (args.num_workers >= 0, f"--num_workers must not be negative, got {args.num_workers}"),
        (all(s >= 0 for s in args.seed), "--seed values must not be negative"),
        (len(set(args.seed)) == len(args.seed), "--seed values must be distinct"),
        (not (args.resume and args.overwrite),
         "--resume and --overwrite contradict each other: --resume continues the interrupted run, --overwrite "
         "starts over"),
        (args.dist_timeout > 0, f"--dist_timeout must be positive, got {args.dist_timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    bad = [m for m in args.schedule if not 0 < m <= args.epochs]
    if bad:
        raise UserError(f"--schedule milestone {bad[0]} is outside 1..{args.epochs} (--epochs)")


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


def seed_output(path: Path, seed: int, several: bool) -> Path:
    """The output of one seed: ``runs/x.pth`` becomes ``runs/x_s30.pth`` when several seeds run."""
    if not several:
        return path
    return path.with_name(f"{path.stem}_s{seed}{path.suffix}")


def default_output(args) -> Path:
    """Where a run writes when --path_to_save is not given."""
    if args.training_type == "fine_tune":
        return Path("runs") / f"{args.teacher}_heads"
    arch = args.teacher if args.training_type == "ce" else args.student
    return Path("runs") / f"{args.training_type}_{arch}.pth"


def configure_backends(args) -> None:
    """cuDNN benchmarking unless --deterministic, which also forces deterministic algorithms."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: a process running several commands (tests) must not inherit the previous one's mode.
    torch.use_deterministic_algorithms(args.deterministic)
    torch.backends.cudnn.benchmark = not args.deterministic


def resolve_data_path(args, data: dataload.DataBundle, device: torch.device) -> str:
    """``auto`` becomes ``device`` when the training images fit comfortably in the device's memory."""
    if args.data_path != "auto":
        return args.data_path
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if data.train.images.numel() < free // 4 else "loader"


def summarize(args, device) -> None:
    """Print the model with torchsummary (the teacher for ce, else the student)."""
    from torchsummary import summary
    from models_repo import build_model
    info = dataload.load_data(args.dataset, args.data_dir, 0).info
    arch = args.teacher if args.training_type in ("ce", "fine_tune") else args.student
    model = build_model(arch, info.num_classes).to(device)
    summary(model, (3, info.image_size, info.image_size), device=device.type)


def evaluate_saved(ctx: train_funcs.RunContext) -> dict:
    """``--training_type test``: top-1/top-5 of --saved_path (and its heads) on the test split."""
    from dih_utils import Cohort, fingerprint, heads_meta, load_heads, mount_shapes
    args = ctx.args
    if args.saved_path is None:
        raise UserError("test needs --saved_path (the model to evaluate)")
    meta = train_funcs.safe_load(args.saved_path, "checkpoint")
    arch = meta.get("arch", args.teacher)
    model, _ = train_funcs.load_trained(ctx, arch, args.saved_path, "checkpoint")
    heads = None
    if args.saved_intermediates_directory:
        hmeta = heads_meta(arch, ctx.info.num_classes, ctx.info.image_size, ctx.info.name,
                           mount_shapes(model, ctx.info.image_size), fingerprint(model))
        heads = load_heads(args.saved_intermediates_directory, model, hmeta).to(ctx.device)
    cohort = Cohort(model, heads)

    def outputs(x):
        logits = cohort(x)
        return {arch: logits[0], **{f"head_{i}": h for i, h in enumerate(logits[1:], start=1)}}

    metrics = train_funcs.evaluate_outputs(outputs, ctx.data.test, ctx)
    ctx.say(f"{'model':<12} {'top-1':>7} {'top-5':>7}")
    for name, m in metrics.items():
        ctx.say(f"{name:<12} {m['top1']:7.2f} {m['top5']:7.2f}")
    first = next(iter(metrics.values()))
    return {"test_top1": first["top1"], "test_top5": first["top5"], "final_test": metrics}


def check_seed_outputs(args) -> None:
    """Refuse an existing output of any seed before the first seed trains (each method checks its other phases)."""
    if args.training_type == "test":
        return
    out = Path(args.path_to_save) if args.path_to_save else default_output(args)
    for seed in args.seed:
        paths = train_funcs.RunPaths.for_output(seed_output(out, seed, len(args.seed) > 1),
                                                is_dir=args.training_type in DIRECTORY_OUTPUTS)
        train_funcs.check_claim(paths, args)


def run(argv=None, data_cache: dict | None = None) -> int:
    """Parse, validate, load the data once, and run each seed; return the exit code.

    ``data_cache``: datasets already loaded, by their flags, shared by the runs of one pipeline.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args)
    if args.training_type == "pipeline":
        return pipeline.run_pipeline(args, parser, run)
    dist = from_env()
    distributed.check_devices(dist, args.gpu_id)
    device = resolve_device(args.gpu_id, dist.local_rank)
    configure_backends(args)
    if args.summary:
        summarize(args, device)
        return 0
    check_seed_outputs(args)
    key = (args.dataset, args.data_dir, args.val_size, args.train_subset)
    data = data_cache.get(key) if data_cache is not None else None
    if data is None:
        data = dataload.load_data(args.dataset, args.data_dir, args.val_size, train_subset=args.train_subset)
        if data_cache is not None:
            data_cache[key] = data
    distributed.check_world(dist, data, args.batch_size, device, args.sync_bn)
    with distributed.process_group(dist, device, args.dist_timeout):
        return run_seeds(args, dist, device, data)


def run_seeds(args, dist, device, data: dataload.DataBundle) -> int:
    """Run ``--training_type`` once per seed (every rank together under torchrun) and summarise."""
    # Ranks must agree: the two data paths draw differently from the shared data generator.
    choice = resolve_data_path(args, data, device)
    args.data_path = "device" if dist.all_true(choice == "device") else "loader"
    entry = evaluate_saved if args.training_type == "test" else TRAINING_TYPES[args.training_type]
    out = Path(args.path_to_save) if args.path_to_save else default_output(args)
    several = len(args.seed) > 1 and args.training_type != "test"
    results = []
    for seed in args.seed if args.training_type != "test" else args.seed[:1]:
        train_funcs.seed_everything(seed)
        ctx = train_funcs.RunContext(args, device, data, dist, seed, seed_output(out, seed, several))
        results.append(entry(ctx))
        if several:
            ctx.say(f"seed {seed}: test top-1 {results[-1]['test_top1']:.2f}%")
    if several and dist.is_main:
        accs = [r["test_top1"] for r in results]
        print(f"test top-1 over {len(accs)} seeds: {statistics.mean(accs):.2f} +- {statistics.stdev(accs):.2f} "
              f"(mean +- sample std; seeds {' '.join(map(str, args.seed))})")
    return 0


def main_as(training_type: str, argv, prog: str) -> int:
    """Entry of a per-method script (e.g. ``CRD/train_student.py``): the console with a fixed training type.

    A ``--training_type`` in ``argv`` naming another type is refused rather than silently overriding.
    """
    probe = build_parser(prog)
    probe.set_defaults(training_type=None)
    given = probe.parse_known_args(argv)[0].training_type
    if given not in (None, training_type):
        print(f"error: {prog} trains --training_type {training_type}, not {given}; drop --training_type "
              f"or use final_test.py --training_type {given}", file=sys.stderr)
        return 2
    return main(["--training_type", training_type, *argv])


def main(argv=None) -> int:
    """Console entry: user errors become one line on stderr and exit code 2."""
    try:
        return run(argv)
    except UserError as e:
        # An error all ranks raised together is reported once, by rank 0.
        if not isinstance(e, distributed.SharedUserError) or from_env().is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except train_funcs.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted: stopped at once; the checkpoint of the last finished epoch (if any) is kept: rerun the "
              "same command with --resume", file=sys.stderr)
        return 130
    except train_funcs.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
