"""``--training_type kd``: the student learns from the trained teacher's final logits (Hinton et al.).

``Distillation`` is KD from every member of a frozen cohort, summed: with heads it is DIH (``train_dih``).
"""
from torch import nn

from dih_utils import Cohort
from KD_Loss import dih_loss
from method_contract import StudentMethod
from model_loading import load_teacher, model_meta, new_model
from registry import STUDENT_KEYS, TrainingType
from run_context import RunContext
from run_outputs import RunPaths, claim_outputs
from train_funcs import run_phase


class Distillation(StudentMethod):
    """KD from every member of a frozen cohort, summed (DIH); with no heads it is plain KD."""

    def __init__(self, student: nn.Module, meta: dict, cohort: Cohort, alpha: float, temperature: float):
        super().__init__(student, meta)
        self.cohort = cohort
        self.alpha, self.temperature = alpha, temperature

    def forward(self, x, y, idx):
        """The cohort's logits from one frozen pass, then the summed KD loss."""
        logits = self.student(x)
        return dih_loss(logits, self.cohort(x), y, self.alpha, self.temperature), logits


def distil(ctx: RunContext, teacher: nn.Module, heads, student_arch: str, paths: RunPaths, phase: str,
           finished: bool, student: nn.Module | None = None, **extra_meta) -> dict:
    """Train ``student_arch`` with KD from ``teacher`` (and DIH when ``heads`` are given).

    ``student``: an already initialised student (FitNets stage 2), else a fresh one; ``extra_meta`` is
    recorded in the model and result files.
    """
    models = ctx.cfg.models
    cohort = Cohort(teacher, heads)
    meta = model_meta(ctx, student_arch, teacher=models.teacher, kd_alpha=models.kd_alpha,
                      kd_temperature=models.kd_temperature, num_heads=len(cohort.heads), **extra_meta)
    if student is None:
        student = new_model(ctx, student_arch)
    method = Distillation(student, meta, cohort, models.kd_alpha, models.kd_temperature)
    return run_phase(method, ctx, paths, ctx.cfg.optim, phase, meta, finished)


def train_kd(ctx: RunContext) -> dict:
    """KD from the frozen ``--saved_path`` teacher into a fresh ``--student``."""
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    return distil(ctx, teacher, None, ctx.cfg.models.student, paths, "kd", done)


def bench_kd(parts) -> Distillation:
    """One KD step from the bench's teacher."""
    m = parts.cfg.models
    return Distillation(parts.student(), {}, Cohort(parts.teacher), m.kd_alpha, m.kd_temperature)


TRAINING_TYPE = TrainingType(
    name="kd", run=train_kd, depends_on=STUDENT_KEYS, needs=frozenset({"teacher"}), report_order=10,
    frozen_reference=True,
    summary="knowledge distillation from the teacher's final logits", bench=bench_kd)
