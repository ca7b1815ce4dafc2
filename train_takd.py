"""TAKD (Mirzadeh et al. 2020): teacher -> one teacher assistant -> student, both hops with the run's KD.

The assistant is written beside the student as ``<stem>_ta_<arch>.pth`` (with its own result file), or
taken from ``--saved_ta_path`` when it is already trained.
"""
from pathlib import Path

from dih_utils import freeze
from errors import UserError
from models_repo import count_parameters
from train_funcs import RunContext, RunPaths, claim_outputs, distil, load_teacher, load_trained, skeleton


def check_ta_size(ctx: RunContext) -> None:
    """Refuse an assistant with more parameters than the teacher or fewer than the student."""
    args = ctx.args
    sizes = {arch: count_parameters(skeleton(ctx, arch)) for arch in (args.teacher, args.ta, args.student)}
    ta, teacher, student = sizes[args.ta], sizes[args.teacher], sizes[args.student]
    if ta > teacher:
        raise UserError(f"--ta {args.ta} ({ta:,} parameters) is larger than the teacher {args.teacher} "
                        f"({teacher:,}); a teacher assistant must sit between teacher and student")
    if ta < student:
        raise UserError(f"--ta {args.ta} ({ta:,} parameters) is smaller than the student {args.student} "
                        f"({student:,}); a teacher assistant must sit between teacher and student")
    ctx.say(f"[takd] {args.teacher} ({teacher:,}) -> {args.ta} ({ta:,}) -> {args.student} ({student:,} parameters)")


def ta_output(out: Path, ta_arch: str) -> Path:
    """Where the assistant is written: ``runs/x.pth`` -> ``runs/x_ta_res20.pth``."""
    return out.with_name(f"{out.stem}_ta_{ta_arch}{out.suffix}")


def train_takd(ctx: RunContext) -> dict:
    """``--training_type takd``: KD teacher -> ``--ta`` (unless ``--saved_ta_path``), then KD ``--ta`` -> student."""
    args = ctx.args
    check_ta_size(ctx)
    student_paths = RunPaths.for_output(ctx.out)
    if args.saved_ta_path is not None:
        ta_file, ta_result = Path(args.saved_ta_path), None
        assistant, _ = load_trained(ctx, args.ta, ta_file, "teacher assistant checkpoint")
        done, = claim_outputs(ctx, [student_paths])
    else:
        teacher = load_teacher(ctx)
        ta_paths = RunPaths.for_output(ta_output(ctx.out, args.ta))
        ta_file, ta_result = ta_paths.final, str(ta_paths.result)
        done_ta, done = claim_outputs(ctx, [ta_paths, student_paths])
        distil(ctx, teacher, None, args.ta, ta_paths, "takd_ta", done_ta, role="teacher assistant",
               student_model=str(student_paths.final))
        assistant, _ = load_trained(ctx, args.ta, ta_file, "teacher assistant checkpoint")
    return distil(ctx, freeze(assistant), None, args.student, student_paths, "takd", done, ta=args.ta,
                  ta_model=str(ta_file), ta_result=ta_result)
