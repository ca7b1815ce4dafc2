"""``--training_type dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022) from the teacher's final logits.

``CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``, each part times ``T^2``, with mdistiller's
defaults (alpha 1, beta 8, T 4, warm-up 20 epochs): docs/LOGIT_METHODS.md. DIH's cohort can use the same
member loss (``--training_type dih --cohort_loss dkd``), with these flags.
"""
from dataclasses import dataclass

from dihkit.foundations.flags import Range, flag
from KD_Loss import dkd_member
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.foundations.settings import ModelSettings
from train_kd import KDSettings, Objective, bench_distillation, distil_from_teacher, with_ls

# mdistiller's mdistiller/engine/cfg.py: DKD.ALPHA, DKD.BETA, DKD.T, DKD.WARMUP (its CE_WEIGHT 1.0 is fixed here).
DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_TEMPERATURE, DEFAULT_WARMUP = 1.0, 8.0, 4.0, 20


@dataclass(frozen=True)
class DKDSettings(KDSettings):
    """DKD's weights of the target-class and non-target-class terms, and its warm-up in epochs."""
    dkd_alpha: float
    dkd_beta: float
    dkd_warmup: int


FLAGS = (
    flag("--dkd_alpha", type=float, default=DEFAULT_ALPHA, range=Range(0),
         help="weight of DKD's target-class term TCKD"),
    flag("--dkd_beta", type=float, default=DEFAULT_BETA, range=Range(0),
         help="weight of DKD's non-target-class term NCKD (mdistiller's CIFAR ResNet configs use 2)"),
    flag("--dkd_warmup", type=int, default=DEFAULT_WARMUP, range=Range(0),
         help="epochs over which DKD's terms ramp up linearly from 1/warmup to 1 (0: no warm-up)"),
)


def dkd_objective(models: ModelSettings, s: DKDSettings) -> Objective:
    """DKD per member: ``CE + warm-up * (alpha * TCKD + beta * NCKD)`` at ``--kd_temperature``."""
    member = dkd_member(s.dkd_alpha, s.dkd_beta, models.kd_temperature, logit_std=s.logit_std)
    meta = {"dkd_alpha": s.dkd_alpha, "dkd_beta": s.dkd_beta, "dkd_warmup": s.dkd_warmup,
            "kd_temperature": models.kd_temperature, "logit_std": s.logit_std}
    return Objective(member, meta, warmup=s.dkd_warmup)


def train_dkd(ctx: RunContext) -> dict:
    """DKD from the frozen ``--saved_path`` teacher into a fresh ``--student``."""
    return distil_from_teacher(ctx, "dkd", dkd_objective(ctx.cfg.models, ctx.cfg.method))


def dkd_label(flags) -> str:
    """``DKD (alpha 1, beta 8, T 4)``, ``+LS`` with standardised logits."""
    return with_ls(f"DKD (alpha {flags.get('dkd_alpha'):g}, beta {flags.get('dkd_beta'):g}, "
                   f"T {flags.get('kd_temperature'):g})", flags)


TRAINING_TYPE = TrainingType(
    name="dkd", run=train_dkd, flags=FLAGS, settings=DKDSettings, needs=frozenset({"teacher"}),
    depends_on=("teacher", "student", "kd_temperature", "logit_std") + tuple(f.dest for f in FLAGS),
    flag_defaults={"kd_temperature": DEFAULT_TEMPERATURE}, report_order=25, frozen_reference=True,
    label=dkd_label, bench=lambda parts: bench_distillation(parts, dkd_objective(parts.cfg.models, parts.cfg.method)),
    description=f"decoupled KD: CE + warm-up x (--dkd_alpha x TCKD + --dkd_beta x NCKD) at --kd_temperature "
                f"(default {DEFAULT_TEMPERATURE:g}; 2 with --logit_std); --kd_alpha is not used by dkd",
    summary="DKD: CE plus decoupled KD (target and non-target terms) from the teacher's final logits")
