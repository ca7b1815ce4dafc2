"""Published recipes as data: each value a recipe sets, the training types and model pairs it applies to, and
the upstream file it comes from (docs/RECIPES.md is generated from these tables by scripts/gen_recipes.py).

``resolve`` turns recipe names, a training type and a teacher/student pair into the values they set; the
console (``dihkit/console/recipe_flags.py``) fills every flag the user did not give from them. Model names
are matched as strings, the toolkit's CIFAR ``res<N>`` as the upstream ``resnet<N>`` (the same networks).
"""
import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Milestones:
    """MultiStepLR milestones stated for ``of`` epochs: scaled to the run's epochs (exact at ``of``)."""
    at: tuple
    of: int

    def scaled(self, epochs: int) -> list:
        """The milestones for ``epochs`` epochs: the same fractions, at least 1, distinct, at most ``epochs``."""
        return sorted({min(epochs, max(1, round(m * epochs / self.of))) for m in self.at})

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.at))} of {self.of} epochs (scaled to --epochs)"


@dataclass(frozen=True)
class Entry:
    """One value of a recipe: ``dest`` (the flag) takes ``value`` for the listed training types (empty: all),
    students (empty: all) and (teacher, student) pairs (empty: all); ``val_only``: only with ``--val_size``."""
    dest: str
    value: object
    source: str
    types: tuple = ()
    students: tuple = ()
    pairs: tuple = ()
    val_only: bool = False

    def applies(self, training_type: str, teacher: str, student: str, val_size: int) -> bool:
        """Whether this value is meant for this run."""
        return ((not self.types or training_type in self.types)
                and (not self.students or student in self.students)
                and (not self.pairs or (teacher, student) in self.pairs)
                and (val_size > 0 or not self.val_only))


@dataclass(frozen=True)
class Recipe:
    """A named set of values; later entries that apply replace earlier ones (general first, then specific)."""
    name: str
    summary: str
    entries: tuple


@dataclass(frozen=True)
class Resolved:
    """A value a recipe set, and where it comes from."""
    value: object
    recipe: str
    source: str


DIH_PAPER = "DIH paper, hyper-parameter table (REFERENCE.md section 2)"
DIH_HEADS = "DIH authors' code, train_regular_middle_logits: each head at its epoch of lowest validation loss"
DIH_DATALOAD = "DIH authors' dataload.py, get_cifar: Normalize constants"
DIH_MILESTONES = Milestones((60, 120, 180), 200)
MDISTILLER_CFG = "megvii-research/mdistiller mdistiller/engine/cfg.py"
REPDISTILLER = "HobbitLong/RepDistiller train_student.py"
REPDISTILLER_RUNS = "HobbitLong/RepDistiller scripts/run_cifar_distill.sh"
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
DIST_CIFAR = "hunto/image_classification_sota configs/strategies/distill/dist_cifar.yaml (REFERENCE.md section 6)"
DIST_IMAGENET = "hunto/DIST_KD README.md, ImageNet runs (REFERENCE.md section 6)"
LS_REPO = "sunshangquan/logit-standardization-KD"
LS_TRAIN = f"{LS_REPO} tools/train.py (--base-temp 2, --kd-weight 9) and mdistiller/engine/cfg.py"
LS_KD_WEIGHT = 9.0
# The DIH authors' code after its commit "Hyperparameters tuning" (to compare with the baselines).
DIH_CODE_SOURCE = "DIH authors' final_test.py argparse defaults after the commit \"Hyperparameters tuning\""

DIH = Recipe("dih", "the DIH paper's recipe, the console's own values (200 epochs, lr 0.1, 60/120/180, T 5, alpha 0.1)", (
    Entry("epochs", 200, DIH_PAPER), Entry("lr", 0.1, DIH_PAPER), Entry("schedule", DIH_MILESTONES, DIH_PAPER),
    Entry("schedule_gamma", 0.1, DIH_PAPER), Entry("batch_size", 64, DIH_PAPER), Entry("wd", 5e-4, DIH_PAPER),
    Entry("momentum", 0.9, DIH_PAPER), Entry("nesterov", True, "DIH authors' code (SGD with nesterov)"),
    Entry("normalization", "dih", DIH_DATALOAD),
    Entry("head_selection", "lowest_val_loss", DIH_HEADS, types=("fine_tune",), val_only=True),
))

DIH_CODE = Recipe("dih_code", "the DIH authors' code's values after their README (240 epochs, batch 128, lr 0.05, "
                  "150/180/210, gamma 0.2, reflect-padded crops), for comparison with the baselines", (
    Entry("epochs", 240, f"{DIH_CODE_SOURCE}: --epochs"), Entry("batch_size", 128, f"{DIH_CODE_SOURCE}: --batch_size"),
    Entry("lr", 0.05, f"{DIH_CODE_SOURCE}: --lr"),
    Entry("schedule", Milestones((150, 180, 210), 240), f"{DIH_CODE_SOURCE}: --schedule"),
    Entry("schedule", Milestones((60, 120, 180), 240), "DIH authors' final_test.py, ce branch: MultiStepLR "
          "milestones=[60, 120, 180] written in place of args.schedule (the same commit)", types=("ce",)),
    Entry("schedule_gamma", 0.2, f"{DIH_CODE_SOURCE}: --schedule_gamma"), Entry("wd", 5e-4, f"{DIH_CODE_SOURCE}: --wd"),
    Entry("momentum", 0.9, f"{DIH_CODE_SOURCE}: --momentum"), Entry("nesterov", True, f"{DIH_CODE_SOURCE}: --nesterov"),
    Entry("crop_padding", "reflect", "DIH authors' dataload.py after the same commit: RandomCrop(32, padding=4, "
          "padding_mode='reflect')"),
    Entry("normalization", "dih", DIH_DATALOAD),
    Entry("schedule_fitnets_1", [], f"{DIH_CODE_SOURCE}: --schedule_fitnets_1 60 120 180, past stage 1's 40 "
          "epochs: its lr never decays", types=("fitnets",)),
    Entry("head_selection", "lowest_val_loss", DIH_HEADS, types=("fine_tune",), val_only=True),
))

# mdistiller's per-pair DKD beta (configs/cifar100/dkd/<pair>.yaml); every other pair keeps cfg.py's 8.
DKD_BETA = (
    Entry("dkd_beta", 8.0, f"{MDISTILLER_CFG} (DKD.BETA)", types=("dkd",)),
    Entry("dkd_beta", 6.0, "megvii-research/mdistiller configs/cifar100/dkd/{vgg13_vgg8,wrn40_2_wrn_16_2,"
          "wrn40_2_wrn_40_1,vgg13_mv2}.yaml", types=("dkd",),
          pairs=(("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "MobileNetV2"))),
    Entry("dkd_beta", 2.0, "megvii-research/mdistiller configs/cifar100/dkd/{res56_res20,res110_res32}.yaml",
          types=("dkd",), pairs=(("resnet56", "resnet20"), ("resnet110", "resnet32"))),
)

CRD = Recipe("crd", "the CRD/mdistiller CIFAR-100 protocol (240 epochs, lr 0.05, 150/180/210), mdistiller's KD "
             "weights, DKD's per-pair beta, and RepDistiller's CRD, AT and one-stage FitNet runs", (
    Entry("epochs", 240, REPDISTILLER), Entry("lr", 0.05, REPDISTILLER),
    Entry("lr", 0.01, f"{REPDISTILLER} (lr 0.01 for these students)", students=SMALL_LR_STUDENTS),
    Entry("schedule", Milestones((150, 180, 210), 240), REPDISTILLER),
    Entry("schedule_gamma", 0.1, REPDISTILLER), Entry("batch_size", 64, REPDISTILLER),
    Entry("wd", 5e-4, REPDISTILLER), Entry("momentum", 0.9, REPDISTILLER),
    Entry("nesterov", False, f"{REPDISTILLER} (plain SGD momentum)"),
    Entry("normalization", "repdistiller", "HobbitLong/RepDistiller dataset/cifar100.py and mdistiller "
          "mdistiller/dataset/cifar100.py: Normalize constants"),
    Entry("ce_weight", 0.1, f"{MDISTILLER_CFG} (KD.LOSS.CE_WEIGHT); {REPDISTILLER_RUNS}: kd -r 0.1", types=("kd",)),
    Entry("kd_weight", 0.9, f"{MDISTILLER_CFG} (KD.LOSS.KD_WEIGHT); {REPDISTILLER_RUNS}: kd -a 0.9", types=("kd",)),
    Entry("kd_temperature", 4.0, f"{MDISTILLER_CFG} (KD.TEMPERATURE); {REPDISTILLER} --kd_T 4", types=("kd",)),
    Entry("kd_alpha", 0.0, f"{REPDISTILLER_RUNS}: CRD -a 0 (no KD term; CRD+KD is -a 1: --kd_alpha 1)", types=("crd",)),
    Entry("beta", 0.8, f"{REPDISTILLER_RUNS}: CRD -b 0.8", types=("crd",)),
    Entry("kd_temperature", 4.0, f"{REPDISTILLER} --kd_T 4 (the KD term of CRD+KD)", types=("crd",)),
    Entry("at_beta", 1000.0, f"{REPDISTILLER_RUNS}: attention -b 1000", types=("at",)),
    Entry("at_kd_alpha", 0.0, f"{REPDISTILLER_RUNS}: attention -a 0", types=("at",)),
    Entry("fitnets_stages", 1, f"{REPDISTILLER_RUNS}: hint, one stage (no init phase for hint in train_student.py)",
          types=("fitnets",)),
    Entry("hint_weight", 100.0, f"{REPDISTILLER_RUNS}: hint -a 0 -b 100", types=("fitnets",)),
    Entry("hint_layer", 1, f"{REPDISTILLER} --hint_layer 2: feat[2], the second stage's output", types=("fitnets",)),
    Entry("guided_layer", 1, f"{REPDISTILLER} --hint_layer 2 (the student's feat[2] too)", types=("fitnets",)),
) + DKD_BETA)

DKD = Recipe("dkd", "DKD's per-pair beta from mdistiller's CIFAR-100 configs (2, 6, else 8)", DKD_BETA)

DIST_CIFAR_RECIPE = Recipe("dist_cifar", "DIST's CIFAR setting: beta = gamma = 2, tau 4, CE 1", (
    Entry("dist_beta", 2.0, DIST_CIFAR, types=("dist",)), Entry("dist_gamma", 2.0, DIST_CIFAR, types=("dist",)),
    Entry("kd_temperature", 4.0, DIST_CIFAR, types=("dist",)),
))

DIST_IMAGENET_RECIPE = Recipe("dist_imagenet", "DIST's ImageNet setting: beta = gamma = 2, tau 1, CE 1", (
    Entry("dist_beta", 2.0, DIST_IMAGENET, types=("dist",)), Entry("dist_gamma", 2.0, DIST_IMAGENET, types=("dist",)),
    Entry("kd_temperature", 1.0, DIST_IMAGENET, types=("dist",)),
))

# Logit standardisation's published CIFAR-100 runs, as its README names their logs: KD_TYPE,TEACHER,STUDENT,
# BASE_TEMPERATURE,KD_WEIGHT[,BETA]. tools/train.py sets KD's temperature and weight from them (CE stays cfg.py's
# 0.1); for DKD it sets DKD.T, and DKD.ALPHA and DKD.BETA to the config's value times the weight, a BETA in the
# name replacing the config's (DKD's CE weight stays cfg.py's 1.0). Pairs in the upstream spelling.
LS_KD_RUNS = {
    ("resnet32x4", "resnet8x4"): (2, 9), ("vgg13", "vgg8"): (3, 9), ("wrn_40_2", "wrn_40_1"): (2, 9),
    ("wrn_40_2", "wrn_16_2"): (2, 9), ("resnet56", "resnet20"): (2, 9), ("resnet110", "resnet32"): (2, 9),
    ("resnet110", "resnet20"): (4, 12), ("resnet32x4", "ShuffleV2"): (2, 9), ("resnet32x4", "wrn_16_2"): (3, 9),
    ("resnet32x4", "wrn_40_2"): (3, 9), ("wrn_40_2", "resnet8x4"): (2, 9), ("wrn_40_2", "MobileNetV2"): (3, 9),
    ("vgg13", "MobileNetV2"): (3, 9), ("ResNet50", "MobileNetV2"): (3, 1),
}
LS_DKD_RUNS = {
    ("resnet32x4", "resnet8x4"): (2, 9, None), ("vgg13", "vgg8"): (2, 15, 2.0), ("wrn_40_2", "wrn_40_1"): (2, 12, 2.0),
    ("wrn_40_2", "wrn_16_2"): (2, 12, 2.0), ("resnet56", "resnet20"): (3, 18, 2.0),
    ("resnet110", "resnet32"): (2, 15, 2.0), ("resnet110", "resnet20"): (2, 15, 2.0),
    ("resnet32x4", "ShuffleV2"): (2, 9, None), ("resnet32x4", "wrn_16_2"): (2, 9, 2.0),
    ("resnet32x4", "wrn_40_2"): (2, 9, 8.0), ("wrn_40_2", "resnet8x4"): (2, 18, 2.0),
    ("wrn_40_2", "MobileNetV2"): (2, 15, 2.0), ("vgg13", "MobileNetV2"): (3, 9, 2.0),
    ("ResNet50", "MobileNetV2"): (2, 15, 2.0),
}


def ls_log(kind: str, pair: tuple, *values) -> str:
    """The source of a published LS run's values: its log file, as the README links it."""
    name = ",".join([kind.lower(), *pair, *(f"{v:g}" if isinstance(v, int) else f"{v:.1f}" for v in values
                                            if v is not None)])
    return f"{LS_REPO} README.md, log {kind}/{name}.txt"


def config_dkd_beta(pair: tuple) -> float:
    """The DKD beta of mdistiller's config for ``pair`` (what a log name without a BETA keeps)."""
    return next(e.value for e in reversed(DKD_BETA) if not e.pairs or pair in e.pairs)


def ls_run_entries() -> tuple:
    """One entry per value of each published LS run, sourced by its log name."""
    out = []
    for pair, (t, w) in LS_KD_RUNS.items():
        src = ls_log("KD", pair, t, w)
        out += [Entry("kd_temperature", float(t), src, types=("kd",), pairs=(pair,)),
                Entry("kd_weight", float(w), src, types=("kd",), pairs=(pair,))]
    for pair, (t, w, beta) in LS_DKD_RUNS.items():
        base = beta if beta is not None else config_dkd_beta(pair)
        src = ls_log("DKD", pair, t, w, beta) + ("" if beta else f" (BETA: the config's {base:g})")
        out += [Entry("kd_temperature", float(t), src, types=("dkd",), pairs=(pair,)),
                Entry("dkd_alpha", 1.0 * w, src, types=("dkd",), pairs=(pair,)),
                Entry("dkd_beta", base * w, src, types=("dkd",), pairs=(pair,))]
    return tuple(out)


LS = Recipe("ls", "logit standardisation's runs: each of its 14 published KD and DKD pairs as its log names it; "
            "other pairs KD with CE 0.1, KD 9, base T 2 and DKD with alpha and beta x9", (
    Entry("logit_std", True, LS_TRAIN, types=("kd", "dkd")),
    Entry("ce_weight", 0.1, LS_TRAIN, types=("kd",)), Entry("kd_weight", LS_KD_WEIGHT, LS_TRAIN, types=("kd",)),
    Entry("kd_temperature", 2.0, LS_TRAIN, types=("kd", "dkd")),
    Entry("dkd_alpha", LS_KD_WEIGHT, f"{LS_TRAIN}: DKD.ALPHA x 9", types=("dkd",)),
) + tuple(replace(e, value=e.value * LS_KD_WEIGHT, source=f"{LS_TRAIN}: DKD.BETA x 9, on {e.source}")
          for e in DKD_BETA) + ls_run_entries())

RECIPES = {r.name: r for r in (DIH, DIH_CODE, CRD, DKD, DIST_CIFAR_RECIPE, DIST_IMAGENET_RECIPE, LS)}
DEFAULT_RECIPE = "dih"

# ImageNet (docs/IMAGENET.md). The model pairs are the registry's ImageNet networks (torchvision's names and
# mdistiller's MobileNetV1). A recipe's batch size is one process's: under torchrun give --batch_size divided by
# the number of processes (mdistiller's 512 is the global batch of its one DataParallel process).
MDISTILLER_IMAGENET_CFG = "megvii-research/mdistiller configs/imagenet/{r34_r18,r50_mv1}/{kd,dkd}.yaml"
MDISTILLER_SGD = "megvii-research/mdistiller mdistiller/engine/trainer.py (SGD without nesterov)"
TORCHDISTILL_KD = ("yoshitomo-matsubara/torchdistill configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/"
                   "kd-resnet18_from_resnet34.yaml")
IMAGENET_MILESTONES = Milestones((30, 60, 90), 100)


def imagenet_protocol(source: str, batch_size: int, lr: float, nesterov_source: str) -> tuple:
    """The SGD protocol both ImageNet recipes share (100 epochs, 30/60/90, gamma 0.1, wd 1e-4, momentum 0.9)
    with their own batch size and lr."""
    return (Entry("epochs", 100, source), Entry("lr", lr, source), Entry("schedule", IMAGENET_MILESTONES, source),
            Entry("schedule_gamma", 0.1, source), Entry("batch_size", batch_size, source),
            Entry("wd", 1e-4, source), Entry("momentum", 0.9, source), Entry("nesterov", False, nesterov_source))


MDISTILLER_IMAGENET = Recipe(
    "mdistiller_imagenet", "mdistiller's ImageNet runs (batch 512, lr 0.2, 100 epochs, 30/60/90, wd 1e-4); KD at T 1 "
    "with CE 0.5 / KD 0.5; DKD at T 1, warm-up 1 epoch, beta 0.5 (resnet34->resnet18) or 2 (resnet50->mobilenet_v1)",
    imagenet_protocol(MDISTILLER_IMAGENET_CFG, 512, 0.2, MDISTILLER_SGD) + (
        Entry("ce_weight", 0.5, f"{MDISTILLER_IMAGENET_CFG} (KD.LOSS.CE_WEIGHT)", types=("kd",)),
        Entry("kd_weight", 0.5, f"{MDISTILLER_IMAGENET_CFG} (KD.LOSS.KD_WEIGHT)", types=("kd",)),
        Entry("kd_temperature", 1.0, f"{MDISTILLER_IMAGENET_CFG} (KD.TEMPERATURE, DKD.T)", types=("kd", "dkd")),
        Entry("dkd_warmup", 1, f"{MDISTILLER_IMAGENET_CFG} (DKD.WARMUP)", types=("dkd",)),
        Entry("dkd_beta", 0.5, "megvii-research/mdistiller configs/imagenet/r34_r18/dkd.yaml (DKD.BETA)",
              types=("dkd",), pairs=(("resnet34", "resnet18"),)),
        Entry("dkd_beta", 2.0, "megvii-research/mdistiller configs/imagenet/r50_mv1/dkd.yaml (DKD.BETA)",
              types=("dkd",), pairs=(("resnet50", "mobilenet_v1"),)),
    ))

TORCHDISTILL_IMAGENET = Recipe(
    "torchdistill_imagenet", "torchdistill's ImageNet KD resnet34->resnet18 (batch 256, lr 0.1, 100 epochs, "
    "30/60/90, wd 1e-4; T 1, CE 0.5 / KD 0.5)",
    imagenet_protocol(TORCHDISTILL_KD, 256, 0.1, f"{TORCHDISTILL_KD} (SGD, no nesterov)") + (
        Entry("ce_weight", 0.5, f"{TORCHDISTILL_KD} (KDLoss alpha 0.5 weights CE)", types=("kd",)),
        Entry("kd_weight", 0.5, f"{TORCHDISTILL_KD} (KDLoss 1 - alpha weights T^2 KL)", types=("kd",)),
        Entry("kd_temperature", 1.0, f"{TORCHDISTILL_KD} (KDLoss temperature)", types=("kd",)),
    ))

RECIPES.update({r.name: r for r in (MDISTILLER_IMAGENET, TORCHDISTILL_IMAGENET)})


def upstream_name(model: str | None) -> str | None:
    """The upstream spelling of a model name: the toolkit's CIFAR ``res110`` is ``resnet110`` (depths 6n+2);
    others unchanged (``res18`` is not torchvision's ``resnet18``)."""
    found = re.fullmatch(r"res(\d+)", model or "")
    return f"resnet{found[1]}" if found and (int(found[1]) - 2) % 6 == 0 else model


def resolve(names, training_type: str, teacher: str | None, student: str | None, val_size: int = 0) -> dict:
    """``{flag dest: Resolved}`` for the recipes ``names`` (a later recipe's value replaces an earlier one's)."""
    teacher, student = upstream_name(teacher), upstream_name(student)
    values = {}
    for name in names:
        for e in RECIPES[name].entries:
            if e.applies(training_type, teacher, student, val_size):
                values[e.dest] = Resolved(e.value, name, e.source)
    return values
