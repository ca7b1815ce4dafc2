"""Attention transfer (Zagoruyko & Komodakis 2017) on the stage outputs, with an optional KD term.

Loss: ``(1 - a) * CE + a * T^2 * KL + beta * sum_i mean((a(F_s,i) - a(F_t,i))^2)`` with ``a`` =
``--at_kd_alpha`` (default 0: plain AT, CE + attention term), T = ``--kd_temperature`` and beta =
``--at_beta`` (1000, RepDistiller's run_cifar_distill.sh). The attention term is RepDistiller's AT.py, which
the DIH authors ship too (``KD_Loss.at_loss``: of two maps of different sizes the larger feature map is pooled
first). Stage i of the student is paired with stage i of the teacher, so both must have the same number of
stages; the stages' outputs are RepDistiller's feature points (``feat[1:-1]``) on every benchmark model.
"""
from dataclasses import dataclass

from dih_utils import Cohort, mount_shapes
from dihkit.foundations.flags import Range, flag
from KD_Loss import at_loss, kd_loss
from dihkit.runs.method_contract import StudentMethod
from dihkit.methods.feature_baselines import require_same_stages
from dihkit.runs.model_loading import load_teacher, model_meta, new_model
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_funcs import run_phase


@dataclass(frozen=True)
class ATSettings:
    """The attention term's weight and exponent, and the weight of an optional KD term."""
    at_beta: float
    at_p: float
    at_kd_alpha: float


FLAGS = (
    flag("--at_beta", type=float, default=1000.0, range=Range(0),
         help="weight beta of the attention term (beta * sum over the stages, as RepDistiller's and the DIH "
              "authors' AT.py and Zagoruyko's code compute it)"),
    flag("--at_p", type=float, default=2.0, range=Range(0, lo_open=True),
         help="exponent p of the attention map mean_c |F|^p"),
    flag("--at_kd_alpha", type=float, default=0.0, range=Range(0, 1),
         help="weight of an added KD term for at (0: CE + attention only); --kd_alpha is not used by at"),
)


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


def train_at(ctx: RunContext) -> dict:
    """Train the student with attention transfer from the trained teacher."""
    models, s, size = ctx.cfg.models, ctx.cfg.method, ctx.info.image_size
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    student = new_model(ctx, models.student)
    pairs = zip(mount_shapes(student, size), mount_shapes(teacher, size))
    ctx.say("[at] attention pairs (student <- teacher map size): "
            + ", ".join(f"stage {i}: {s[1]}x{s[2]} <- {t[1]}x{t[2]}" for i, (s, t) in enumerate(pairs))
            + "; extra modules: none (0 parameters)")
    meta = model_meta(ctx, models.student, teacher=models.teacher, at_beta=s.at_beta, at_p=s.at_p,
                      at_kd_alpha=s.at_kd_alpha, kd_temperature=models.kd_temperature)
    method = AttentionTransfer(student, meta, Cohort(teacher), s.at_beta, s.at_p, s.at_kd_alpha, models.kd_temperature)
    return run_phase(method, ctx, paths, ctx.cfg.optim, "at", meta, done)


def bench_at(parts) -> AttentionTransfer:
    """One AT step with the default weights."""
    s = parts.cfg.method
    return AttentionTransfer(parts.student(), {}, Cohort(parts.teacher), s.at_beta, s.at_p, s.at_kd_alpha,
                             parts.cfg.models.kd_temperature)


def at_label(flags) -> str:
    """AT, naming the KD term when one is added."""
    alpha = flags.get("at_kd_alpha", 0)
    return f"AT+KD (alpha {alpha:g})" if alpha else "AT"


TRAINING_TYPE = TrainingType(
    name="at", run=train_at, flags=FLAGS, settings=ATSettings, needs=frozenset({"teacher"}),
    depends_on=("teacher", "student", "kd_temperature") + tuple(f.dest for f in FLAGS), report_order=50,
    bench=bench_at, label=at_label, same_stages=True, pre_data_check=require_same_stages, description="attention transfer on the stage outputs",
    summary="AT: the student matches the teacher's attention maps at every stage output (+ CE)")
