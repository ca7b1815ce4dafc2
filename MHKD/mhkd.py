"""Multi-head knowledge distillation (MHKD) on the toolkit's loop.

Teacher and student carry one head at each stage output (the mount points DIH uses): two
conv-BN-ReLU layers, global average pooling and two fully connected layers. The teacher's heads are
fine-tuned on the frozen teacher first; then each student head learns from the teacher's head at the
same stage (CE + beta * KD) while the student's final logits get the KD loss against the teacher's.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dih_utils import Cohort, mount_shapes
from dihkit.methods.feature_baselines import BETA_FLAG, heads_outputs, report_extra, require_same_stages, teacher_heads
from dihkit.foundations.flags import flag
from KD_Loss import kd_kl_term, weighted_kd_member
from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import load_teacher, model_meta, new_model
from models_repo.base import conv_bn_relu, init_weights
from dihkit.foundations.registry import STUDENT_KEYS, WEIGHT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths
from train_funcs import run_phase
from train_kd import with_ls

# The weight of each head's KD term when --beta is not given.
DEFAULT_BETA = 1.0


@dataclass(frozen=True)
class MHKDSettings:
    """Each head's KD weight, the teacher's already fine-tuned heads to reuse, and whether the KD terms
    standardise their logits."""
    beta: float
    saved_mhkd_directory: str | None
    logit_std: bool


FLAGS = (
    BETA_FLAG,
    flag("--saved_mhkd_directory", default=None,
         help="the teacher's fine-tuned heads to reuse (default: fine-tune them first into "
              "<output stem>_mhkd_teacher_aux/)"),
)

# Heads on narrow stages are widened to this many channels so that they can classify at all.
MIN_HEAD_WIDTH = 64


class MultiHead(nn.Module):
    """conv-BN-ReLU twice (``width`` channels), global average pooling, fc-ReLU-fc to the classes."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes))
        init_weights(self)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Logits of one stage output."""
        return self.fc(torch.flatten(self.pool(self.convs(feat)), 1))


def build_multi_heads(model: nn.Module, num_classes: int, image_size: int) -> nn.ModuleList:
    """One MultiHead per stage of ``model``, its input width from a dry run, ``max(64, C)`` channels wide."""
    return nn.ModuleList(MultiHead(c, num_classes, max(MIN_HEAD_WIDTH, c))
                         for c, _, _ in mount_shapes(model, image_size))


class MHKDMethod(StudentMethod):
    """KD on the final logits plus, per stage, CE + beta * KD between the student's and the teacher's heads;
    ``logit_std`` standardises the logits of every KD term (``--logit_std``)."""

    def __init__(self, student: nn.Module, heads: nn.ModuleList, meta: dict, cohort: Cohort, weights: tuple,
                 beta: float, temperature: float, logit_std: bool = False):
        super().__init__(student, meta)
        self.heads = heads
        self.cohort = cohort
        # The final logits' KD term: (KD weight, CE weight), ModelSettings.kd_weights().
        self.final_kd = weighted_kd_member(*weights, temperature, logit_std=logit_std)
        self.beta, self.temperature, self.logit_std = beta, temperature, logit_std

    def forward(self, x, y, idx):
        """The MHKD objective for one batch and the student's final logits."""
        logits, feats, _ = self.student(x, features=True)
        teacher = self.cohort(x)  # [final logits, head_1, ..., head_k], stage order
        loss = self.final_kd(logits, teacher[0], y)
        for head, feat, t_logits in zip(self.heads, feats, teacher[1:], strict=True):
            s_logits = head(feat)
            kd = kd_kl_term(s_logits, t_logits, self.temperature, logit_std=self.logit_std)
            loss = loss + F.cross_entropy(s_logits.float(), y) + self.beta * kd
        return loss, logits


def train_mhkd(ctx: RunContext) -> dict:
    """Fine-tune (or reuse) the teacher's heads, then train the student with its own."""
    models, s, classes, size = ctx.cfg.models, ctx.cfg.method, ctx.info.num_classes, ctx.info.image_size
    beta = s.beta
    teacher = load_teacher(ctx)
    student = new_model(ctx, models.student)
    heads = build_multi_heads(student, classes, size).to(ctx.device)
    paths = RunPaths.for_output(ctx.out)
    teacher_multi, done = teacher_heads(ctx, teacher, build_multi_heads(teacher, classes, size),
                                        s.saved_mhkd_directory, paths)
    kd_weight, ce_weight = models.kd_weights()
    meta = model_meta(ctx, models.student, teacher=models.teacher, kd_alpha=models.kd_alpha, kd_weight=kd_weight,
                      ce_weight=ce_weight, kd_temperature=models.kd_temperature, beta=beta, logit_std=s.logit_std,
                      num_heads=len(heads))
    method = MHKDMethod(student, heads, meta, Cohort(teacher, teacher_multi), (kd_weight, ce_weight), beta,
                        models.kd_temperature, s.logit_std)
    report_extra(ctx, {"heads": heads})
    return run_phase(method, ctx, paths, ctx.cfg.optim, "mhkd", meta, done)


def bench_mhkd(parts) -> MHKDMethod:
    """MHKD with fresh multi-layer heads on both sides (the teacher's frozen)."""
    student, m = parts.student(), parts.cfg.models
    heads = build_multi_heads(student, parts.classes, parts.size)
    teacher_heads_ = parts.frozen(build_multi_heads(parts.teacher, parts.classes, parts.size))
    return MHKDMethod(student, heads, {}, Cohort(parts.teacher, teacher_heads_), m.kd_weights(),
                      parts.cfg.method.beta, m.kd_temperature, parts.cfg.method.logit_std)


TRAINING_TYPE = TrainingType(
    name="mhkd", run=train_mhkd, flags=FLAGS, flag_defaults={"beta": DEFAULT_BETA}, settings=MHKDSettings, needs=frozenset({"teacher"}),
    depends_on=STUDENT_KEYS + WEIGHT_KEYS + ("beta", "logit_std"), report_order=80, bench=bench_mhkd, same_stages=True,
    pre_data_check=require_same_stages,
    label=lambda flags: with_ls("mhkd", flags),
    outputs=lambda out, flags: heads_outputs(out, flags, "saved_mhkd_directory"),
    description=f"multi-head knowledge distillation: KD on the final logits, and per stage head CE + --beta x KD "
                f"(--beta default {DEFAULT_BETA})",
    summary="MHKD: multi-layer heads on teacher and student; each student head learns from the teacher's")
