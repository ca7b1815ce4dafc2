"""TAKD (Mirzadeh et al. 2020): teacher -> one teacher assistant -> student, both hops with the run's KD.

The assistant is written beside the student as ``<stem>_ta_<arch>.pth`` (with its own result file), or
taken from ``--saved_ta_path`` when it is already trained.
"""
from dataclasses import dataclass
from pathlib import Path

from dih_utils import freeze
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import flag
from dihkit.runs.model_loading import load_teacher, load_trained, size_before_classifier
from dihkit.foundations.settings import Settings
from models_repo import MODELS
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
         help="teacher assistant: no more parameters than the teacher, no fewer than the student (each counted "
              "without its classifier)"),
    flag("--saved_ta_path", default=None,
         help="an already trained assistant, skipping the first hop (default: train it)"),
)


def check_ta_size(cfg: Settings) -> None:
    """Refuse an assistant with more parameters than the teacher or fewer than the student, before any data:
    each counted without its classifier, whose size follows the dataset's classes."""
    models, ta_arch = cfg.models, cfg.method.ta
    ta, teacher, student = map(size_before_classifier, (ta_arch, models.teacher, models.student))
    where = "parameters before the classifier"
    if ta > teacher:
        raise UserError(f"--ta {ta_arch} ({ta:,} {where}) is larger than the teacher {models.teacher} "
                        f"({teacher:,}); a teacher assistant must sit between teacher and student")
    if ta < student:
        raise UserError(f"--ta {ta_arch} ({ta:,} {where}) is smaller than the student {models.student} "
                        f"({student:,}); a teacher assistant must sit between teacher and student")


def ta_output(out: Path, ta_arch: str) -> Path:
    """Where the assistant is written: ``runs/x.pth`` -> ``runs/x_ta_res20.pth``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_ta_{ta_arch}{out.suffix}")


def train_takd(ctx: RunContext) -> dict:
    """KD teacher -> ``--ta`` (unless ``--saved_ta_path``), then KD ``--ta`` -> student."""
    s, models = ctx.cfg.method, ctx.cfg.models
    objective = kd_objective(models, s.logit_std)
    ctx.say("[takd] " + " -> ".join(f"{arch} ({size_before_classifier(arch):,})" for arch in
                                    (models.teacher, s.ta, models.student)) + " parameters before the classifier")
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
    needs=frozenset({"teacher"}), outputs=takd_outputs, pre_data_check=check_ta_size,
    needs_for=lambda flags: frozenset() if flags.get("saved_ta_path") else frozenset({"teacher"}), report_order=40, bench=bench_kd,
    label=lambda flags: with_ls("takd", flags),
    description="teacher assistant knowledge distillation (both hops use the distillation flags)",
    summary="TAKD: KD teacher -> assistant (--ta) -> student")
