"""``--training_type kd``: the student learns from the trained teacher's final logits (Hinton et al.).

``Distillation`` sums one member loss over every member of a frozen cohort (``KD_Loss.cohort_loss``):
with the KD member and no heads it is KD; with heads it is DIH (``train_dih``); DKD (``train_dkd``) and
DIST (``train_dist``) are other member losses.
"""
from dataclasses import dataclass, field, replace

from torch import nn

from dih_utils import Cohort
from dihkit.methods.epoch_count import CountsEpochs
from KD_Loss import MemberLoss, cohort_loss, dkd_warmup_factor, weighted_kd_member
from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import load_teacher, model_meta, new_model
from dihkit.foundations.registry import STUDENT_KEYS, WEIGHT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.foundations.settings import ModelSettings
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_funcs import num_train_batches, run_phase

# The bench times single steps: its epoch length only places the warm-up, which does not change the cost.
BENCH_STEPS_PER_EPOCH = 100


@dataclass(frozen=True)
class KDSettings:
    """Whether the distillation terms standardise their logits (``--logit_std``)."""
    logit_std: bool


@dataclass(frozen=True)
class Objective:
    """What a distillation run trains: each cohort member's loss, and the warm-up of its distillation part."""
    member: MemberLoss
    meta: dict = field(default_factory=dict)  # its weights, recorded in the model and result files
    warmup: int = 0                           # epochs over which the distillation part ramps up linearly; 0: none


def kd_objective(models: ModelSettings, logit_std: bool = False) -> Objective:
    """KD per member, ``alpha * T^2 * KL + (1 - alpha) * CE`` (or ``--kd_weight``/``--ce_weight``): with one
    member KD, with heads DIH's loss."""
    kd_weight, ce_weight = models.kd_weights()
    t = models.kd_temperature
    used = ({"ce_weight": ce_weight, "kd_weight": kd_weight} if models.ce_weight is not None
            else {"kd_alpha": models.kd_alpha})
    return Objective(weighted_kd_member(kd_weight, ce_weight, t, logit_std=logit_std),
                     {**used, "kd_temperature": t, "logit_std": logit_std})


def weights_label(label: str, flags) -> str:
    """A KD report label, followed by its separate weights when the run gave them (``--ce_weight``)."""
    if flags.get("ce_weight") is None:
        return with_ls(label, flags)
    return with_ls(f"{label} (CE {flags.get('ce_weight'):g}, KD {flags.get('kd_weight'):g}, "
                   f"T {flags.get('kd_temperature'):g})", flags)


def with_ls(label: str, flags) -> str:
    """A report label, marked ``+LS`` when the run standardised its logits (``--logit_std``)."""
    return f"{label} +LS" if flags.get("logit_std") else label


class Distillation(StudentMethod, CountsEpochs):
    """The objective's member loss from every member of a frozen cohort, summed; with a warm-up the
    distillation part is scaled by ``min(epoch / warmup, 1)`` (epochs from 1), counted on the device."""

    def __init__(self, student: nn.Module, meta: dict, cohort: Cohort, objective: Objective, *, epochs: int = 1,
                 steps_per_epoch: int = 1):
        super().__init__(student, meta)
        self.cohort, self.objective = cohort, objective
        if objective.warmup:
            self.count_epochs(epochs, steps_per_epoch)

    def member(self) -> MemberLoss:
        """The member loss of the next training batch: the warm-up factor of its epoch applied."""
        member, warmup = self.objective.member, self.objective.warmup
        if not warmup:
            return member
        factor = dkd_warmup_factor(self.current_epoch() + 1, warmup)
        return replace(member, distill_weight=member.distill_weight * factor)

    def forward(self, x, y, idx):
        """The cohort's logits from one frozen pass, then the summed member loss."""
        logits = self.student(x)
        loss = cohort_loss(logits, self.cohort(x), y, self.member())
        if self.objective.warmup:
            self.count_step()
        return loss, logits


def distil(ctx: RunContext, teacher: nn.Module, heads, student_arch: str, paths: RunPaths, phase: str,
           finished: bool, student: nn.Module | None = None, objective: Objective | None = None,
           **extra_meta) -> dict:
    """Train ``student_arch`` from ``teacher`` (and its ``heads``, DIH) with ``objective`` (default: the run's KD).

    ``student``: an already initialised student (FitNets stage 2), else a fresh one; ``extra_meta`` is
    recorded in the model and result files.
    """
    models = ctx.cfg.models
    objective = objective or kd_objective(models)
    cohort = Cohort(teacher, heads)
    meta = model_meta(ctx, student_arch, teacher=models.teacher, num_heads=len(cohort.heads), **objective.meta,
                      **extra_meta)
    if student is None:
        student = new_model(ctx, student_arch)
    warmup, epochs = objective.warmup, ctx.cfg.optim.epochs
    if warmup > epochs:  # legal (short trial runs) but easy to miss: the terms never reach their full weight
        ctx.say(f"note: the {warmup}-epoch warm-up is longer than the {epochs}-epoch run; the distillation "
                f"terms reach {epochs / warmup:.0%} of their weight")
    steps = num_train_batches(len(ctx.data.train), ctx.cfg.data.batch_size, ctx.dist.world_size)
    method = Distillation(student, meta, cohort, objective, epochs=epochs, steps_per_epoch=steps)
    return run_phase(method, ctx, paths, ctx.cfg.optim, phase, meta, finished)


def distil_from_teacher(ctx: RunContext, phase: str, objective: Objective) -> dict:
    """``objective`` from the frozen ``--saved_path`` teacher's final logits into a fresh ``--student``."""
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    return distil(ctx, teacher, None, ctx.cfg.models.student, paths, phase, done, objective=objective)


def train_kd(ctx: RunContext) -> dict:
    """KD from the frozen ``--saved_path`` teacher into a fresh ``--student``."""
    return distil_from_teacher(ctx, "kd", kd_objective(ctx.cfg.models, ctx.cfg.method.logit_std))


def bench_distillation(parts, objective: Objective, heads: nn.ModuleList | None = None) -> Distillation:
    """One step of ``objective`` from the bench's teacher (and ``heads``)."""
    return Distillation(parts.student(), {}, Cohort(parts.teacher, heads), objective, epochs=parts.cfg.optim.epochs,
                        steps_per_epoch=BENCH_STEPS_PER_EPOCH)


def bench_kd(parts) -> Distillation:
    """One KD step from the bench's teacher."""
    return bench_distillation(parts, kd_objective(parts.cfg.models, parts.cfg.method.logit_std))


TRAINING_TYPE = TrainingType(
    name="kd", run=train_kd, settings=KDSettings, depends_on=STUDENT_KEYS + ("logit_std",) + WEIGHT_KEYS,
    needs=frozenset({"teacher"}), report_order=10, frozen_reference=True, label=lambda flags: weights_label("kd", flags),
    summary="knowledge distillation from the teacher's final logits", bench=bench_kd)
