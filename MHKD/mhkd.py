"""Multi-head knowledge distillation (MHKD) on the toolkit's loop.

Teacher and student carry one head at each stage output (the mount points DIH uses): two
conv-BN-ReLU layers, global average pooling and two fully connected layers. The teacher's heads are
fine-tuned on the frozen teacher first; then each student head learns from the teacher's head at the
same stage (CE + beta * KD) while the student's final logits get the KD loss against the teacher's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dih_utils import Cohort, mount_shapes
from feature_baselines import report_extra, require_same_stages, resolve_beta, teacher_heads
from KD_Loss import kd_loss, soft_kl
from models_repo.base import conv_bn_relu, init_weights
from train_funcs import OptimConfig, RunContext, RunPaths, StudentMethod, load_teacher, model_meta, new_model, run_phase

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
    """KD on the final logits plus, per stage, CE + beta * KD between the student's and the teacher's heads."""

    def __init__(self, student: nn.Module, heads: nn.ModuleList, meta: dict, cohort: Cohort, alpha: float,
                 beta: float, temperature: float):
        super().__init__(student, meta)
        self.heads = heads
        self.cohort = cohort
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, x, y, idx):
        """The MHKD objective for one batch and the student's final logits."""
        logits, feats, _ = self.student(x, features=True)
        teacher = self.cohort(x)  # [final logits, head_1, ..., head_k], stage order
        loss = kd_loss(logits, teacher[0], y, self.alpha, self.temperature)
        for head, feat, t_logits in zip(self.heads, feats, teacher[1:], strict=True):
            s_logits = head(feat)
            loss = loss + F.cross_entropy(s_logits.float(), y) + self.beta * soft_kl(s_logits, t_logits,
                                                                                     self.temperature)
        return loss, logits


def train_mhkd(ctx: RunContext) -> dict:
    """``--training_type mhkd``: fine-tune (or reuse) the teacher's heads, then train the student with its own."""
    args, classes, size = ctx.args, ctx.info.num_classes, ctx.info.image_size
    beta = resolve_beta(args)
    require_same_stages(ctx)
    teacher = load_teacher(ctx)
    student = new_model(ctx, args.student)
    heads = build_multi_heads(student, classes, size).to(ctx.device)
    paths = RunPaths.for_output(ctx.out)
    teacher_multi, done = teacher_heads(ctx, teacher, build_multi_heads(teacher, classes, size),
                                        args.saved_mhkd_directory, paths)
    meta = model_meta(ctx, args.student, teacher=args.teacher, kd_alpha=args.kd_alpha,
                      kd_temperature=args.kd_temperature, beta=beta, num_heads=len(heads))
    method = MHKDMethod(student, heads, meta, Cohort(teacher, teacher_multi), args.kd_alpha, beta,
                        args.kd_temperature)
    report_extra(ctx, {"heads": heads})
    return run_phase(method, ctx, paths, OptimConfig.from_args(args), "mhkd", meta, done)
