"""The console's parser: the shared flags in groups, then one group per registered training type.

Every numeric flag declares its range here (or in its training type's module); ``final_test`` checks
all of them before anything is loaded.
"""
import dataload
from dihkit.files.checkpoints import safe_load
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import HelpFormatter, Parser, Range, Unset, add_flags, flag, given, parse_bool
from KD_Loss import LOGIT_STD_TEMPERATURE
from models_repo import MODELS
from dihkit.foundations.registry import REGISTRY, ordered
from dihkit.foundations.recipes import DIH_MILESTONES
from dihkit.console.recipe_flags import RECIPE_FLAGS

MODES = ("pipeline", "test")
SEED_RANGE = Range(0, 2 ** 32 - 1, distinct=True)
DEFAULT_METHODS = ("ce", "kd", "dih")
# Shared flags whose default a training type may replace (registry ``flag_defaults``); unset, they are None
# until the console resolves them for the command's type.
SHARED_DEFAULTS = {"kd_alpha": 0.1, "kd_temperature": 5.0}


def default_milestones(epochs: int) -> list:
    """The recipe's MultiStepLR milestones for ``epochs`` epochs: 30%, 60% and 90%, at least 1, distinct."""
    return DIH_MILESTONES.scaled(epochs)


RUN_FLAGS = (
    flag("--seed", type=int, nargs="+", default=[30, 50, 67], range=SEED_RANGE,
         help="one run per seed (0..2^32-1); several seeds get _s<seed> output suffixes and a mean/std summary"),
    flag("--concurrent_seeds", type=int, default=1, range=Range(1),
         help="train this many of the --seed runs at once, each its own process on the same device (output in "
              "<output>.log); 1: one after the other in this process; in a pipeline, this many of its steps at "
              "once, each once the teacher or heads it needs exist (docs/PIPELINES.md)"),
    flag("--gpu_id", default=None,
         help="cuda:N or cpu (default: cuda:0 if available, else cpu; cuda:<LOCAL_RANK> under torchrun)"),
    flag("--resume", action="store_true", help="continue an interrupted run from its checkpoint"),
    flag("--nan_policy", default="stop", choices=["stop", "skip"],
         help="on a non-finite loss: stop the run, or skip the batch and count it (a run stops when more than "
              "half of an epoch's batches are skipped)"),
    flag("--deterministic", action="store_true",
         help="deterministic algorithms, no cuDNN benchmarking (reproducible, slower)"),
    flag("--summary", action="store_true", help="print the model with torchsummary and exit"),
)
DATA_FLAGS = (
    flag("--dataset", default="cifar100", choices=dataload.DATASET_NAMES, help="the dataset"),
    flag("--data_dir", default="./data", help="where datasets are read from or downloaded to"),
    flag("--val_size", type=int, default=0, range=Range(0),
         help="class-balanced validation images held out of the training set (0: none)"),
    flag("--train_subset", type=int, default=0, range=Range(0),
         help="train on a class-balanced subset of this many training images (0: all)"),
    flag("--label_noise", type=float, default=0.0, range=Range(0, 1, hi_open=True),
         help="give this fraction of the training images a wrong label, another class drawn at random (the same "
              "images and labels for every seed and method; the test split keeps its labels): learning from "
              "noisy labels"),
    flag("--batch_size", type=int, default=64, range=Range(1), help="batch size (per process under torchrun)"),
    flag("--num_workers", type=int, default=None, range=Range(0),
         help="DataLoader worker processes per training process on the loader and stream paths (default: 2 on "
              "loader; on stream this process's share of the CPU cores less one, at most 16)"),
    flag("--prefetch_factor", type=int, default=2, range=Range(1),
         help="batches each loader worker prepares ahead (loader and stream paths)"),
    flag("--persistent_workers", type=parse_bool, default=True,
         help="keep the loader workers alive from one epoch to the next (True/False)"),
    flag("--cache_dir", default=None,
         help="where decoded image folders and Tiny-ImageNet are cached between runs (default: "
              "$XDG_CACHE_HOME/dih-toolkit, else ~/.cache/dih-toolkit)"),
    flag("--no_cache", action="store_true", help="decode image files on every run; write no cache"),
    flag("--normalization", default="dih", choices=list(dataload.NORMALIZATIONS),
         help="the per-channel mean/std of the inputs: dih: the DIH authors' dataload.py (CIFAR-10/100); "
              "repdistiller: RepDistiller's and mdistiller's (CIFAR-100); dataset: the dataset's own stated or "
              "measured constants; a table that lacks the dataset keeps its own (docs/RECIPES.md)"),
    flag("--crop_padding", default="zeros", choices=list(dataload.PADDINGS),
         help="padding of the 4-pixel random crop: zeros (as torchvision's RandomCrop pads) or reflect (the border mirrored, "
              "as the DIH authors' tuned code does)"),
    flag("--data_path", default="auto", choices=["auto", "device", "loader", "stream"],
         help="device: whole dataset on the training device, augmented there; loader: torchvision "
              "DataLoader over the decoded images; stream: image files decoded per batch in loader workers "
              "(imagenet always; docs/IMAGENET.md); auto: stream an image folder whose decoded images exceed "
              "half the memory, else device when it fits in the device's memory, else loader"),
    flag("--crop_size", type=int, default=None, range=Range(8),
         help="the stream path's crop: RandomResizedCrop for training, resize to crop*256/224 and centre crop "
              "for evaluation (default: 224 for imagenet; a streamed imagefolder: its first image's shorter "
              "side, at most 224)"),
)
OPTIM_FLAGS = (
    flag("--epochs", type=int, default=200, range=Range(1), help="training epochs"),
    flag("--lr", type=float, default=0.1, range=Range(0, lo_open=True), help="SGD learning rate"),
    flag("--wd", type=float, default=5e-4, range=Range(0), help="weight decay"),
    flag("--momentum", type=float, default=0.9, range=Range(0, 1, hi_open=True), help="SGD momentum"),
    flag("--nesterov", type=parse_bool, default=True, help="nesterov momentum (True/False)"),
    flag("--schedule", type=int, nargs="+", default=None, range=Range(1, increasing=True),
         help="MultiStepLR milestones, strictly increasing (default: 30%%, 60%% and 90%% of --epochs, "
              "60 120 180 for 200 epochs)"),
    flag("--schedule_gamma", type=float, default=0.1, range=Range(0, lo_open=True),
         help="lr decay factor at each milestone"),
)
DISTILL_FLAGS = (
    flag("--teacher", default=Unset("res110"), choices=list(MODELS),
         help="teacher architecture (the model trained by --training_type ce); a type that reads its teacher from "
              "--saved_path takes the architecture that file records unless this flag is given"),
    flag("--student", default="res8", choices=list(MODELS), help="student architecture"),
    flag("--saved_path", default=None,
         help="the trained teacher checkpoint (or, with --training_type test, the model to evaluate) (default: none)"),
    flag("--saved_intermediates_directory", default=None, help="heads written by fine_tune (default: none)"),
    flag("--kd_temperature", "--temperature", dest="kd_temperature", type=float, default=None,
         range=Range(0, lo_open=True),
         help=f"KD temperature T (default: 5; a training type may set its own, stated in its group; "
              f"{LOGIT_STD_TEMPERATURE:g} with --logit_std)"),
    flag("--kd_alpha", "--alpha", dest="kd_alpha", type=float, default=None, range=Range(0, 1),
         help="weight alpha of the distillation term, 1 - alpha weights CE (default: 0.1; a training type may "
              "set its own, stated in its group)"),
    flag("--logit_std", action="store_true",
         help="logit standardisation (Sun et al. 2024): z-score each sample's student and teacher logits before "
              "every temperature softmax of a distillation term (never CE) of kd, dih, takd, dkd, dist, tofd and "
              f"mhkd; --kd_temperature is then {LOGIT_STD_TEMPERATURE:g} unless given (docs/LOGIT_METHODS.md)"),
)
OUTPUT_FLAGS = (
    flag("--path_to_save", default=None,
         help="output model file, a folder for fine_tune and pipeline (default: runs/<type>_<model>.pth)"),
    flag("--overwrite", action="store_true", help="replace existing outputs"),
)
SPEED_FLAGS = (
    flag("--precision", default="auto", choices=["auto", "fp32", "bf16"],
         help="bf16: bfloat16 autocast on the training device, CUDA or CPU (losses in float32); auto: bf16 on a "
              "CPU with AMX-BF16, else fp32 (docs/SPEED.md); the run's first lines say which and why"),
    flag("--eval_precision", default="fp32", choices=["fp32", "bf16"],
         help="precision of every evaluation (test split each epoch and in --training_type test, validation "
              "split): fp32 whatever --precision trains in, so accuracies are the network's own; bf16: bfloat16 "
              "autocast, faster where bfloat16 is native (docs/SPEED.md)"),
    flag("--memory_format", default="auto", choices=["auto", "contiguous", "channels_last"],
         help="memory format of the trained modules, the frozen teacher/heads and the input; auto: channels_last "
              "with bf16 on a CPU, else contiguous"),
    flag("--compile", action="store_true",
         help="torch.compile the training step (needs a C compiler on CPU; the first batches compile)"),
)
MULTI_GPU_FLAGS = (
    flag("--scale_lr", action="store_true",
         help="multiply --lr by the number of processes (the global batch is world size x --batch_size)"),
    flag("--sync_bn", action="store_true",
         help="SyncBatchNorm in the trained modules: batch statistics over all processes (CUDA only)"),
    flag("--dist_timeout", type=float, default=1800.0, range=Range(0, lo_open=True),
         help="seconds to wait for the other processes at the rendezvous and in any collective"),
)
GROUPS = (
    ("run", "what runs, and how", RUN_FLAGS),
    ("data", "dataset, splits and batches", DATA_FLAGS),
    ("optimisation", "SGD and its schedule (the method's recipe by default)", OPTIM_FLAGS),
    ("distillation", "teacher, student, their trained inputs and the KD term", DISTILL_FLAGS),
    ("recipe", "published settings and loss weights (docs/RECIPES.md); a flag given always wins", RECIPE_FLAGS),
    ("outputs", None, OUTPUT_FLAGS),
    ("speed", None, SPEED_FLAGS),
    ("multi-GPU (torchrun)", "used when launched with torchrun (docs/MULTI_GPU.md)", MULTI_GPU_FLAGS),
)


def resolve_teacher(args) -> None:
    """``--teacher`` when not typed: for a command that reads its teacher from ``--saved_path`` (a type that
    needs one, or a pipeline given one), the architecture that file records, as ``--training_type test``
    reads it; else the default. A missing file is refused here, before any data is read."""
    if given(args, "teacher"):
        return
    t = REGISTRY.get(args.training_type)
    reads = args.training_type == "pipeline" or (t is not None and "teacher" in t.needs)
    recorded = safe_load(args.saved_path, "teacher checkpoint").get("arch") if reads and args.saved_path else None
    if recorded is not None and recorded not in MODELS:
        raise UserError(f"teacher checkpoint '{args.saved_path}' holds a {recorded}, which this toolkit does not build")
    args.teacher = str(recorded or args.teacher)


def resolve_defaults(args) -> None:
    """Fill in the defaults that depend on other flags, in place: the teacher (``resolve_teacher``); the
    schedule follows ``--epochs``; shared flags left unset take, in this order, logit standardisation's
    temperature (``--logit_std``, for a type whose result depends on it), the training type's own default
    (registry ``flag_defaults``), the toolkit's; the cache folder is the user's cache unless ``--no_cache``."""
    resolve_teacher(args)
    if args.schedule is None:
        args.schedule = default_milestones(args.epochs)
    args.cache_dir = None if args.no_cache else (args.cache_dir or dataload.default_cache_dir())
    t = REGISTRY.get(args.training_type)
    own = t.flag_defaults if t else {}
    if t is not None and args.logit_std and "logit_std" in t.depends_on and args.kd_temperature is None:
        args.kd_temperature = LOGIT_STD_TEMPERATURE
    for dest in {*SHARED_DEFAULTS, *own}:
        if getattr(args, dest, None) is None:
            setattr(args, dest, own.get(dest, SHARED_DEFAULTS.get(dest)))


# --help opens with these: a teacher, its heads and a DIH student, small enough for a CPU (the teacher's
# architecture is read from its file), then the shared groups, then one group per training type.
EXAMPLES = (
    "--training_type ce --teacher res20 --dataset synthetic --epochs 2 --seed 3 --gpu_id cpu "
    "--path_to_save runs/teacher.pth",
    "--training_type fine_tune --saved_path runs/teacher.pth --dataset synthetic --epochs 2 --seed 3 --gpu_id cpu "
    "--path_to_save runs/heads",
    "--training_type dih --student res8 --saved_path runs/teacher.pth --saved_intermediates_directory runs/heads "
    "--dataset synthetic --epochs 2 --seed 3 --gpu_id cpu --path_to_save runs/dih_model.pth",
)
DESCRIPTION = "\n".join([
    "Train teachers, heads and students for DIH and its baselines. These three commands train a teacher, its "
    "heads and a DIH student on generated data on the CPU.", *(f"  python3 final_test.py {e}" for e in EXAMPLES),
    "Then --training_type test --saved_path runs/dih_model.pth evaluates the student. The shared flags come "
    "first, then one group per training type; every flag with its default: docs/FLAGS.md."])


def pipeline_flags(methods: list) -> tuple:
    """The pipeline's own flags; ``methods``: the training types it can run."""
    return (
        flag("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=methods,
             help="the student methods to run over the seeds (ce: the student trained alone)"),
        flag("--teacher_epochs", type=int, default=None, range=Range(1),
             help="the teacher's epochs (default: --epochs)"),
        flag("--teacher_schedule", type=int, nargs="+", default=None, range=Range(1, increasing=True),
             help="the teacher's MultiStepLR milestones (default: --schedule, else the recipe's fractions of "
                  "the teacher's epochs)"),
        flag("--teacher_train_subset", type=int, default=None, range=Range(0),
             help="the teacher's class-balanced training subset, 0: every training image (default: "
                  "--train_subset); the heads and the students train on --train_subset"),
        flag("--teacher_label_noise", type=float, default=None, range=Range(0, 1, hi_open=True),
             help="the fraction of the teacher's training labels made wrong (default: --label_noise); the heads "
                  "and the students train with --label_noise"),
    )


def build_parser(prog: str = "final_test.py") -> Parser:
    """Every flag of the method's hyper-parameter table and the toolkit's own, grouped, with defaults."""
    types = ordered()
    p = Parser(prog=prog, usage="%(prog)s [--training_type TYPE] [FLAG ...]", description=DESCRIPTION,
               formatter_class=HelpFormatter)
    p.add_argument("--training_type", default="dih", choices=[t.name for t in types] + list(MODES),
                   help="what to train: " + "; ".join(f"{t.name}: {t.summary}" for t in types)
                        + "; test: evaluate --saved_path (and its heads) on the test split; pipeline: teacher, "
                          "heads and --methods over the seeds into one folder (docs/PIPELINES.md)")
    for title, description, group_flags in GROUPS:
        add_flags(p.add_argument_group(title, description), group_flags)
    add_flags(p.add_argument_group("pipeline", "--training_type pipeline: --path_to_save is the pipeline's folder "
                                   "(default runs/<dataset>_<teacher>_<student>); every other flag reaches every step"),
              pipeline_flags([t.name for t in types if t.in_pipeline]))
    seen = {a.dest for a in p._actions}
    for t in types:
        own = [f for f in t.flags if f.dest not in seen]
        if own or t.description:
            add_flags(p.add_argument_group(t.name, t.description or None), own)
        seen.update(f.dest for f in own)
    return p
