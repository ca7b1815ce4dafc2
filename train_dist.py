"""``--training_type dist``: DIST (Huang et al., NeurIPS 2022) from the teacher's final logits.

``CE + beta * inter + gamma * intra``: one minus the Pearson correlation of ``softmax(z / tau)`` between
student and teacher, over each sample's classes (inter) and over each class's samples (intra), each times
``tau^2``; defaults: the class defaults of the authors' loss (beta 1, gamma 1, tau 1), not their runs' settings
(``--recipe dist_cifar``: 2, 2, tau 4; ``--recipe dist_imagenet``: 2, 2, tau 1): docs/LOGIT_METHODS.md. DIH's cohort can
use the same member loss (``--training_type dih --cohort_loss dist``), with these flags.
"""
from dataclasses import dataclass

from dihkit.foundations.flags import Range, flag
from KD_Loss import dist_member
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.foundations.settings import ModelSettings
from train_kd import KDSettings, Objective, bench_distillation, distil_from_teacher, with_ls

# The class defaults of the authors' loss, DIST(beta=1.0, gamma=1.0, tau=1.0); its CE weight 1.0 is fixed here.
DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_TEMPERATURE = 1.0, 1.0, 1.0


@dataclass(frozen=True)
class DISTSettings(KDSettings):
    """DIST's weights of the inter-class and intra-class terms."""
    dist_beta: float
    dist_gamma: float


FLAGS = (
    flag("--dist_beta", type=float, default=DEFAULT_BETA, range=Range(0), help="weight of DIST's inter-class term"),
    flag("--dist_gamma", type=float, default=DEFAULT_GAMMA, range=Range(0), help="weight of DIST's intra-class term"),
)


def dist_objective(models: ModelSettings, s: DISTSettings) -> Objective:
    """DIST per member: ``CE + beta * inter + gamma * intra`` at tau ``--kd_temperature``."""
    member = dist_member(s.dist_beta, s.dist_gamma, models.kd_temperature, logit_std=s.logit_std)
    return Objective(member, {"dist_beta": s.dist_beta, "dist_gamma": s.dist_gamma,
                              "kd_temperature": models.kd_temperature, "logit_std": s.logit_std})


def train_dist(ctx: RunContext) -> dict:
    """DIST from the frozen ``--saved_path`` teacher into a fresh ``--student``."""
    return distil_from_teacher(ctx, "dist", dist_objective(ctx.cfg.models, ctx.cfg.method))


def dist_label(flags) -> str:
    """``DIST (beta 1, gamma 1, tau 1)``, ``+LS`` with standardised logits."""
    return with_ls(f"DIST (beta {flags.get('dist_beta'):g}, gamma {flags.get('dist_gamma'):g}, "
                   f"tau {flags.get('kd_temperature'):g})", flags)


TRAINING_TYPE = TrainingType(
    name="dist", run=train_dist, flags=FLAGS, settings=DISTSettings, needs=frozenset({"teacher"}),
    depends_on=("teacher", "student", "kd_temperature", "logit_std") + tuple(f.dest for f in FLAGS),
    flag_defaults={"kd_temperature": DEFAULT_TEMPERATURE}, report_order=26, frozen_reference=True,
    label=dist_label, bench=lambda parts: bench_distillation(parts, dist_objective(parts.cfg.models, parts.cfg.method)),
    description=f"DIST: CE + --dist_beta x inter-class + --dist_gamma x intra-class relation loss at tau "
                f"--kd_temperature (default {DEFAULT_TEMPERATURE:g}; 2 with --logit_std); the defaults are the class "
                f"defaults of the authors' loss, their runs use --recipe dist_cifar (2, 2, tau 4) or dist_imagenet "
                f"(2, 2, tau 1); --kd_alpha is not used",
    summary="DIST: CE plus inter- and intra-class relation (Pearson) distillation from the teacher's final logits")
