"""TAKD (Mirzadeh et al. 2020): teacher -> one teacher assistant -> student, both hops with the run's KD.

The assistant is written beside the student as ``<stem>_ta_<arch>.pth`` (with its own result file), or
taken from ``--saved_ta_path`` when it is already trained.
"""
from dataclasses import dataclass
from pathlib import Path

from dih_utils import freeze
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import flag
from dihkit.runs.model_loading import load_teacher, load_trained, skeleton
from models_repo import MODELS, count_parameters
from dihkit.foundations.registry import STUDENT_KEYS, WEIGHT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_kd import KDSettings, bench_kd, distil, kd_objective, with_ls


@dataclass(frozen=True)
class TAKDSettings(KDSettings):
    """The assistant's architecture, an already trained one to reuse, and (``KDSettings``) whether both hops'
    KD terms standardise their logits."""
    ta: str
    saved_ta_path: str | None


FLAGS = (
    flag("--ta", default="res20", choices=list(MODELS),
         help="teacher assistant: no more parameters than the teacher, no fewer than the student"),
    flag("--saved_ta_path", default=None,
         help="an already trained assistant, skipping the first hop (default: train it)"),
)


def check_ta_size(ctx: RunContext) -> None:
    """Refuse an assistant with more parameters than the teacher or fewer than the student."""
    models, ta_arch = ctx.cfg.models, ctx.cfg.method.ta
    sizes = {arch: count_parameters(skeleton(ctx, arch)) for arch in (models.teacher, ta_arch, models.student)}
    ta, teacher, student = sizes[ta_arch], sizes[models.teacher], sizes[models.student]
    if ta > teacher:
        raise UserError(f"--ta {ta_arch} ({ta:,} parameters) is larger than the teacher {models.teacher} "
                        f"({teacher:,}); a teacher assistant must sit between teacher and student")
    if ta < student:
        raise UserError(f"--ta {ta_arch} ({ta:,} parameters) is smaller than the student {models.student} "
                        f"({student:,}); a teacher assistant must sit between teacher and student")
    ctx.say(f"[takd] {models.teacher} ({teacher:,}) -> {ta_arch} ({ta:,}) -> {models.student} ({student:,} parameters)")


def ta_output(out: Path, ta_arch: str) -> Path:
    """Where the assistant is written: ``runs/x.pth`` -> ``runs/x_ta_res20.pth``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_ta_{ta_arch}{out.suffix}")


def train_takd(ctx: RunContext) -> dict:
    """KD teacher -> ``--ta`` (unless ``--saved_ta_path``), then KD ``--ta`` -> student."""
    s, models = ctx.cfg.method, ctx.cfg.models
    objective = kd_objective(models, s.logit_std)
    check_ta_size(ctx)
    student_paths = RunPaths.for_output(ctx.out)
    if s.saved_ta_path is not None:
        ta_file, ta_result = Path(s.saved_ta_path), None
        assistant, _ = load_trained(ctx, s.ta, ta_file, "teacher assistant checkpoint")
        done, = claim_outputs(ctx, [student_paths])
    else:
        teacher = load_teacher(ctx)
        ta_paths = RunPaths.for_output(ta_output(ctx.out, s.ta))
        ta_file, ta_result = ta_paths.final, str(ta_paths.result)
        done_ta, done = claim_outputs(ctx, [ta_paths, student_paths])
        distil(ctx, teacher, None, s.ta, ta_paths, "takd_ta", done_ta, objective=objective, role="teacher assistant",
               student_model=str(student_paths.final))
        assistant, _ = load_trained(ctx, s.ta, ta_file, "teacher assistant checkpoint")
    return distil(ctx, freeze(assistant), None, models.student, student_paths, "takd", done, objective=objective,
                  ta=s.ta, ta_model=str(ta_file), ta_result=ta_result)


def takd_outputs(out: Path, flags) -> list:
    """The assistant (unless one is given) and the student."""
    assistant = [] if flags.get("saved_ta_path") else [(ta_output(out, flags["ta"]), False)]
    return assistant + [(Path(out), False)]


TRAINING_TYPE = TrainingType(
    name="takd", run=train_takd, flags=FLAGS, settings=TAKDSettings, depends_on=STUDENT_KEYS + WEIGHT_KEYS + ("ta", "logit_std"),
    needs=frozenset({"teacher"}), outputs=takd_outputs, report_order=40, bench=bench_kd,
    label=lambda flags: with_ls("takd", flags),
    description="teacher assistant knowledge distillation (both hops use the distillation flags)",
    summary="TAKD: KD teacher -> assistant (--ta) -> student")
