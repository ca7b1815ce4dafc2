"""Attention transfer (Zagoruyko & Komodakis 2017) on the stage outputs, with an optional KD term.

Loss: ``(1 - a) * CE + a * T^2 * KL + beta/2 * sum_i mean((a(F_s,i) - a(F_t,i))^2)`` with ``a`` =
``--at_kd_alpha`` (default 0: plain AT, CE + attention term), T = ``--kd_temperature`` and beta =
``--at_beta``. Stage i of the student is paired with stage i of the teacher, so both must have the same
number of stages.
"""
from dih_utils import Cohort, mount_shapes
from errors import UserError
from KD_Loss import at_loss, kd_loss
from train_funcs import (OptimConfig, RunContext, RunPaths, StudentMethod, claim_outputs, load_teacher, model_meta,
                         new_model, run_phase, skeleton)


class AttentionTransfer(StudentMethod):
    """The student matches the teacher's attention maps at every stage output (and optionally its logits)."""

    def __init__(self, student, meta: dict, cohort: Cohort, beta: float, p: float, alpha: float, temperature: float):
        super().__init__(student, meta)
        self.cohort = cohort
        self.beta, self.p, self.alpha, self.temperature = beta, p, alpha, temperature

    def forward(self, x, y, idx):
        """CE (+ KD) on the logits plus the attention term over the paired stage outputs."""
        t_logits, t_feats, _ = self.cohort.features(x)
        logits, feats, _ = self.student(x, features=True)
        loss = kd_loss(logits, t_logits, y, self.alpha, self.temperature) + at_loss(feats, t_feats, self.beta, self.p)
        return loss, logits


def check_at_flags(ctx: RunContext) -> None:
    """Refuse AT settings and model pairs that cannot work, before anything is loaded."""
    args = ctx.args
    if args.at_beta < 0:
        raise UserError(f"--at_beta must not be negative, got {args.at_beta}")
    if args.at_p <= 0:
        raise UserError(f"--at_p must be positive, got {args.at_p}")
    if not 0 <= args.at_kd_alpha <= 1:
        raise UserError(f"--at_kd_alpha must be in [0, 1], got {args.at_kd_alpha}")
    k_t, k_s = skeleton(ctx, args.teacher).num_stages, skeleton(ctx, args.student).num_stages
    if k_t != k_s:
        raise UserError(f"at pairs stages one to one, but the teacher {args.teacher} has {k_t} stages and the "
                        f"student {args.student} has {k_s}; choose a pair with the same number of stages")


def train_at(ctx: RunContext) -> dict:
    """``--training_type at``: train the student with attention transfer from the trained teacher."""
    args, size = ctx.args, ctx.info.image_size
    check_at_flags(ctx)
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    student = new_model(ctx, args.student)
    pairs = zip(mount_shapes(student, size), mount_shapes(teacher, size))
    ctx.say("[at] attention pairs (student <- teacher map size): "
            + ", ".join(f"stage {i}: {s[1]}x{s[2]} <- {t[1]}x{t[2]}" for i, (s, t) in enumerate(pairs))
            + "; extra modules: none (0 parameters)")
    meta = model_meta(ctx, args.student, teacher=args.teacher, at_beta=args.at_beta, at_p=args.at_p,
                      at_kd_alpha=args.at_kd_alpha, kd_temperature=args.kd_temperature)
    method = AttentionTransfer(student, meta, Cohort(teacher), args.at_beta, args.at_p, args.at_kd_alpha,
                               args.kd_temperature)
    return run_phase(method, ctx, paths, OptimConfig.from_args(args), "at", meta, done)
