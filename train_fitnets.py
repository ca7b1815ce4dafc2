"""FitNets (Romero et al. 2015) in two stages: hint regression on the student's lower part, then KD; or, with
``--fitnets_stages 1``, RepDistiller's one-stage FitNet.

Stage 1 trains the student's stem and stages up to the guided layer (plus a regressor when the maps'
shapes differ) to regress the teacher's hint layer with an L2 loss; the rest of the student is never
run in training and keeps its initial weights and batch-norm statistics. Stage 2 is the run's KD on the
whole student, initialised from the stage-1 model.

The one-stage form is what RepDistiller's ``--distill hint -a 0 -b 100`` trains (the FitNet row of its table
and mdistiller's): the whole student with ``CE + --hint_weight * MSE(r(F_s), F_t)`` at the hint layer, ``r``
its ConvReg regressor (``repdistiller_regressor``), in one phase. Either form writes its final student to
``<stem>_final.pth``.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dihkit.files.checkpoints import load_model_file
from dih_utils import Cohort, freeze, mount_shapes
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import Range, flag, parse_bool
from KD_Loss import hint_loss
from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import load_teacher, model_meta, new_model, skeleton
from models_repo import count_parameters
from dihkit.foundations.registry import STUDENT_KEYS, WEIGHT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from dihkit.foundations.settings import OptimSettings, Settings
from train_funcs import run_phase
from train_kd import distil

# Default stage-1 milestones, as fractions of --epochs_fitnets_1 (20 and 30 of 40 epochs).
STAGE1_MILESTONE_FRACTIONS = (0.5, 0.75)


def middle_stage(num_stages: int) -> int:
    """The default hint/guided stage: the middle one (the lower middle for an even count)."""
    return (num_stages - 1) // 2


def resolve_layer(flag: str, value: int | None, arch: str, num_stages: int) -> int:
    """The 0-based stage index of ``--hint_layer``/``--guided_layer``, refusing one the model lacks."""
    if value is None:
        return middle_stage(num_stages)
    if not 0 <= value < num_stages:
        raise UserError(f"{flag} {value} does not exist: {arch} has {num_stages} stages (0..{num_stages - 1})")
    return value


@dataclass(frozen=True)
class FitNetsSettings:
    """Stage 1's optimizer flags and the hint/guided stages."""
    epochs_fitnets_1: int
    lr_fitnets_1: float
    wd_fitnets_1: float
    momentum_fitnets_1: float
    nesterov_fitnets_1: bool
    schedule_fitnets_1: list | None
    schedule_gamma_fitnets_1: float
    hint_layer: int | None
    guided_layer: int | None
    fitnets_stages: int
    hint_weight: float


FLAGS = (
    flag("--epochs_fitnets_1", type=int, default=40, range=Range(1), help="stage-1 epochs"),
    flag("--lr_fitnets_1", type=float, default=0.1, range=Range(0, lo_open=True), help="stage-1 learning rate"),
    flag("--wd_fitnets_1", type=float, default=5e-4, range=Range(0), help="stage-1 weight decay"),
    flag("--momentum_fitnets_1", type=float, default=0.9, range=Range(0, 1, hi_open=True),
         help="stage-1 SGD momentum"),
    flag("--nesterov_fitnets_1", type=parse_bool, default=True, help="stage-1 nesterov (True/False)"),
    flag("--schedule_fitnets_1", type=int, nargs="*", default=None, range=Range(1, increasing=True),
         help="stage-1 MultiStepLR milestones (default: 50%% and 75%% of --epochs_fitnets_1; "
              "the flag with no value: constant lr)"),
    flag("--schedule_gamma_fitnets_1", type=float, default=0.1, range=Range(0, lo_open=True),
         help="stage-1 lr decay factor"),
    flag("--hint_layer", type=int, default=None, range=Range(0),
         help="0-based teacher stage giving the hint (default: the middle stage, (k-1)//2)"),
    flag("--guided_layer", type=int, default=None, range=Range(0),
         help="0-based student stage regressing the hint (default: the middle stage, (k-1)//2)"),
    flag("--fitnets_stages", type=int, default=2, choices=[1, 2], range=Range(1, 2),
         help="2: the seed's FitNets (stage 1 hint regression, stage 2 KD); 1: RepDistiller's one-stage FitNet, "
              "CE + --hint_weight x hint loss through its ConvReg regressor (--recipe crd)"),
    flag("--hint_weight", type=float, default=100.0, range=Range(0),
         help="weight of the hint loss in the one-stage form (RepDistiller's -b 100); unused with 2 stages"),
)


def stage1_config(s: FitNetsSettings) -> OptimSettings:
    """Stage 1's optimizer settings (milestones default to fractions of its epochs)."""
    epochs = s.epochs_fitnets_1
    if s.schedule_fitnets_1 is None:
        milestones = sorted({max(1, round(f * epochs)) for f in STAGE1_MILESTONE_FRACTIONS})
    else:
        milestones = list(s.schedule_fitnets_1)
    if not all(0 < m <= epochs for m in milestones):
        raise UserError(f"--schedule_fitnets_1 milestones must lie in 1..{epochs} (--epochs_fitnets_1), "
                        f"got {milestones}")
    return OptimSettings(epochs, s.lr_fitnets_1, s.wd_fitnets_1, tuple(milestones), s.schedule_gamma_fitnets_1,
                         s.momentum_fitnets_1, s.nesterov_fitnets_1)


def hint_and_guided(cfg: Settings) -> tuple[int, int]:
    """The 0-based teacher (hint) and student (guided) stages; refuses a stage a model lacks."""
    models, s = cfg.models, cfg.method
    hint = resolve_layer("--hint_layer", s.hint_layer, models.teacher, skeleton(models.teacher).num_stages)
    guided = resolve_layer("--guided_layer", s.guided_layer, models.student, skeleton(models.student).num_stages)
    return hint, guided


def check_fitnets(cfg: Settings) -> None:
    """Before any data: the hint and guided stages exist, and the two-stage form's stage-1 milestones lie
    within its epochs."""
    hint_and_guided(cfg)
    if cfg.method.fitnets_stages == 2:
        stage1_config(cfg.method)


def build_regressor(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """The hint regressor: 3x3 conv (no bias) + batch norm from the student's channels to the teacher's.

    Identity when the shapes already agree; a spatial mismatch is left to ``hint_loss``, which pools the
    larger map to the smaller size.
    """
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    cin, cout = student_shape[0], teacher_shape[0]
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


def repdistiller_regressor(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """RepDistiller's ConvReg from a student map (C, H, W) to the teacher's: a 3x3 stride-2 convolution for a map
    twice as large, a 4x4 stride-2 transposed convolution for one half as large, else a convolution whose kernel
    spans the size difference (1x1 for equal sizes); then batch norm and ReLU. Other sizes are refused."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
    if s_h == 2 * t_h:
        conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise UserError(f"RepDistiller's FitNet regressor maps a student map of {s_h}x{s_w} to the teacher's "
                        f"{t_h}x{t_w} only when it is larger or half as large; choose another --hint_layer or "
                        f"--guided_layer")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU(inplace=True))


def final_output(out: Path) -> Path:
    """Where stage 2 writes: ``runs/x.pth`` -> ``runs/x_final.pth``."""
    return out.with_name(f"{out.stem}_final{out.suffix}")


class HintTraining(StudentMethod):
    """FitNets stage 1: the student's stem and stages up to ``guided`` (and the regressor) learn the hint."""

    def __init__(self, student: nn.Module, meta: dict, teacher: nn.Module, regressor: nn.Module, hint: int,
                 guided: int):
        super().__init__(student, meta)
        self.cohort = Cohort(teacher)
        self.regressor = regressor
        self.hint, self.guided = hint, guided
        # A plain list, so these are not registered twice; frozen and kept in eval mode throughout.
        self.untouched = [freeze(m) for m in (*student.stages[guided + 1:], student.tail, student.fc)]

    def train(self, mode: bool = True):
        """Train mode for the trained part only: the untouched part stays in eval mode."""
        super().train(mode)
        for m in self.untouched:
            m.eval()
        return self

    def forward(self, x, y, idx):
        """Hint loss of the regressed guided map; logits through the untouched part, for the progress line."""
        _, teacher_feats, _ = self.cohort.features(x)
        feat = self.student.stem(x)
        for stage in self.student.stages[:self.guided + 1]:
            feat = stage(feat)
        loss = hint_loss(self.regressor(feat), teacher_feats[self.hint])
        with torch.no_grad():
            logits = self.student.forward_from(self.guided, feat)
        return loss, logits


class OneStageFitNet(StudentMethod):
    """RepDistiller's FitNet: the whole student with CE plus ``weight`` times the regressed guided map's MSE
    against the teacher's hint map."""

    def __init__(self, student: nn.Module, meta: dict, teacher: nn.Module, regressor: nn.Module, hint: int,
                 guided: int, weight: float):
        super().__init__(student, meta)
        self.cohort = Cohort(teacher)
        self.regressor = regressor
        self.hint, self.guided, self.weight = hint, guided, weight

    def forward(self, x, y, idx):
        """CE on the logits plus the weighted hint loss."""
        _, teacher_feats, _ = self.cohort.features(x)
        logits, feats, _ = self.student(x, features=True)
        hint = hint_loss(self.regressor(feats[self.guided]), teacher_feats[self.hint])
        return F.cross_entropy(logits.float(), y) + self.weight * hint, logits


def train_one_stage(ctx: RunContext) -> dict:
    """RepDistiller's one-stage FitNet, to ``<stem>_final``."""
    models, s = ctx.cfg.models, ctx.cfg.method
    hint, guided = hint_and_guided(ctx.cfg)
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(final_output(ctx.out))
    done, = claim_outputs(ctx, [paths])
    student = new_model(ctx, models.student)
    t_shape = mount_shapes(teacher, ctx.info.image_size)[hint]
    s_shape = mount_shapes(student, ctx.info.image_size)[guided]
    regressor = repdistiller_regressor(s_shape, t_shape).to(ctx.device)
    ctx.say(f"[fitnets] one stage: CE + {s.hint_weight:g} x hint; {models.teacher} stage {hint} {t_shape} <- "
            f"{models.student} stage {guided} {s_shape} through ConvReg ({count_parameters(regressor):,} parameters)")
    meta = model_meta(ctx, models.student, teacher=models.teacher, fitnets_stages=1, hint_layer=hint,
                      guided_layer=guided, hint_weight=s.hint_weight, regressor_parameters=count_parameters(regressor))
    method = OneStageFitNet(student, meta, teacher, regressor, hint, guided, s.hint_weight)
    return run_phase(method, ctx, paths, ctx.cfg.optim, "fitnets", meta, done)


def train_fitnets(ctx: RunContext) -> dict:
    """Stage 1 (hint) to ``--path_to_save``, stage 2 (KD) to ``<stem>_final``; one stage: ``train_one_stage``."""
    models, info, s = ctx.cfg.models, ctx.info, ctx.cfg.method
    if s.fitnets_stages == 1:
        return train_one_stage(ctx)
    cfg1 = stage1_config(s)
    hint, guided = hint_and_guided(ctx.cfg)
    teacher = load_teacher(ctx)
    stage1, stage2 = RunPaths.for_output(ctx.out), RunPaths.for_output(final_output(ctx.out))
    done1, done2 = claim_outputs(ctx, [stage1, stage2])

    student = new_model(ctx, models.student)
    t_shape = mount_shapes(teacher, info.image_size)[hint]
    s_shape = mount_shapes(student, info.image_size)[guided]
    regressor = build_regressor(s_shape, t_shape).to(ctx.device)
    n_reg = count_parameters(regressor)
    ctx.say(f"[fitnets_1] hint: {models.teacher} stage {hint} {t_shape} <- guided: {models.student} stage {guided} "
            f"{s_shape}; regressor {'conv3x3+BN' if n_reg else 'none (same shape)'}: {n_reg:,} parameters")
    layers = {"hint_layer": hint, "guided_layer": guided}
    meta1 = model_meta(ctx, models.student, teacher=models.teacher, stage=1, regressor_parameters=n_reg,
                       stage_2_model=str(stage2.final), **layers)
    run_phase(HintTraining(student, meta1, teacher, regressor, hint, guided), ctx, stage1, cfg1, "fitnets_1",
              meta1, done1)

    # Stage 2 starts from the last stage-1 epoch: stage 1's accuracy cannot select anything.
    student = new_model(ctx, models.student)
    load_model_file(stage1.final, student, models.student, info.num_classes, "FitNets stage-1 checkpoint", info.name)
    return distil(ctx, teacher, None, models.student, stage2, "fitnets_2", done2, student=student, stage=2,
                  stage_1_model=str(stage1.final), stage_1_result=str(stage1.result), **layers)


def bench_fitnets(parts) -> HintTraining:
    """FitNets' stage 1 on the middle stages (its stage 2 is ``kd``)."""
    student, teacher = parts.student(), parts.teacher
    hint, guided = middle_stage(teacher.num_stages), middle_stage(student.num_stages)
    regressor = build_regressor(mount_shapes(student, parts.size)[guided], mount_shapes(teacher, parts.size)[hint])
    return HintTraining(student, {}, teacher, regressor, hint, guided)


def fitnets_outputs(out: Path, flags) -> list:
    """Stage 1's model and the final student; the one-stage form writes the final student only."""
    final = [(final_output(out), False)]
    return final if flags.get("fitnets_stages") == 1 else [(Path(out), False)] + final


def fitnets_label(flags) -> str:
    """``fitnets``, or RepDistiller's one-stage form with its hint weight."""
    return f"FitNet (one stage, hint {flags.get('hint_weight'):g})" if flags.get("fitnets_stages") == 1 else "fitnets"


TRAINING_TYPE = TrainingType(
    name="fitnets", run=train_fitnets, flags=FLAGS, settings=FitNetsSettings, needs=frozenset({"teacher"}),
    depends_on=STUDENT_KEYS + WEIGHT_KEYS + tuple(f.dest for f in FLAGS), report_order=30,
    outputs=fitnets_outputs, label=fitnets_label, final_output=final_output, final_phase="fitnets_2",
    also_final=("fitnets",), bench=bench_fitnets, pre_data_check=check_fitnets,
    description="FitNets stage 1 (hint regression); stage 2 is KD with the main and distillation flags",
    summary="FitNets: stage 1 regresses the teacher's hint layer, stage 2 is KD (final student in <stem>_final)")
