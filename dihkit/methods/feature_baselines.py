"""What the feature- and head-based baselines (CRD, TOFD, MHKD) share.

``--beta`` is one flag whose meaning and default depend on the method (each states its default in its
help group); the stage-by-stage methods need teacher and student with the same number of stages; TOFD and
MHKD first fine-tune heads on the frozen teacher (or reuse a directory of them) and then train the
student. All of it is checked before anything trains.
"""
from pathlib import Path

from torch import nn

from dih_utils import fingerprint, heads_meta, load_heads, mount_shapes
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import Range, flag
from dihkit.foundations.settings import Settings
from dihkit.runs.model_loading import skeleton
from models_repo import count_parameters
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_fine_tune import HeadTuning
from train_funcs import run_phase

BETA_FLAG = flag("--beta", type=float, default=None, range=Range(0),
                 help="weight of the method's own extra term, described in the method's group (default: the "
                      "method's own, stated there)")


def heads_outputs(out: Path, flags, saved_flag: str) -> list:
    """A head-tuning baseline's outputs: the teacher's heads folder (unless reused) and the student."""
    own = [] if flags.get(saved_flag) else [(default_heads_dir(out, flags["training_type"]), True)]
    return own + [(Path(out), False)]


def require_same_stages(cfg: Settings) -> None:
    """Refuse a ``--teacher`` and ``--student`` whose stage counts differ, before any data (TOFD's and MHKD's
    check): they pair teacher and student stage by stage, and with different counts no pairing is the natural
    one, so the run is refused rather than pairing stages arbitrarily."""
    args = cfg.models
    k_t, k_s = skeleton(args.teacher).num_stages, skeleton(args.student).num_stages
    if k_t != k_s:
        raise UserError(f"{cfg.training_type} pairs teacher and student stage by stage, but --teacher {args.teacher} "
                        f"has {k_t} stages and --student {args.student} has {k_s}; choose models with equal stage counts")


def report_extra(ctx: RunContext, modules: dict) -> None:
    """Print the parameter count of every module trained alongside the student (and saved with it)."""
    counts = ", ".join(f"{name} {count_parameters(m):,}" for name, m in modules.items())
    ctx.say(f"[{ctx.cfg.training_type}] extra modules saved with the student (parameters): {counts}")


def default_heads_dir(out: Path, kind: str) -> Path:
    """Where the teacher's fine-tuned heads go when no directory is given: next to the student's output."""
    out = Path(out)
    return out.with_name(f"{out.stem}_{kind}_teacher_aux")


def teacher_heads(ctx: RunContext, teacher: nn.Module, heads: nn.ModuleList, saved_dir,
                  student_paths: RunPaths) -> tuple[nn.ModuleList, bool]:
    """The teacher's fine-tuned heads for the run's method, and whether the student phase already finished.

    With ``saved_dir`` the heads are loaded from it (checked against this exact teacher) and reused; otherwise
    they are fine-tuned on the frozen teacher (CE on each head, summed, the run's optimizer flags) in a phase
    of their own writing ``<output stem>_<method>_teacher_aux/``. Every output of both phases is claimed
    before anything trains. ``heads`` are freshly built modules that the weights are loaded or trained into.
    """
    args, kind = ctx.cfg.models, ctx.cfg.training_type
    shapes = mount_shapes(teacher, ctx.info.image_size)[:len(heads)]
    meta = {**heads_meta(args.teacher, ctx.info.num_classes, ctx.info.image_size, ctx.info.name, shapes,
                         fingerprint(teacher)), "head_type": kind}
    heads = heads.to(ctx.device)
    if saved_dir is not None:
        saved_dir = Path(saved_dir)
        if not saved_dir.is_dir() or not any(saved_dir.glob("head_*.pth")):
            raise UserError(f"--saved_{kind}_directory '{saved_dir}' holds no head_<i>.pth files; run "
                            f"--training_type {kind} without it once to fine-tune the teacher's heads there")
        heads = load_heads(saved_dir, teacher, meta, heads)
        student_done, = claim_outputs(ctx, [student_paths])
        ctx.say(f"[{kind}] reusing the teacher's {len(heads)} fine-tuned heads from '{saved_dir}'")
        return heads, student_done
    paths = RunPaths.for_output(default_heads_dir(ctx.out, kind), is_dir=True)
    heads_done, student_done = claim_outputs(ctx, [paths, student_paths])
    ctx.say(f"[{kind}_teacher] {len(heads)} heads on the frozen {args.teacher}: "
            + ", ".join(f"{count_parameters(h):,}" for h in heads) + f" parameters, in '{paths.final}'")
    run_phase(HeadTuning(teacher, heads, meta), ctx, paths, ctx.cfg.optim, f"{kind}_teacher",
              {**meta, "seed": ctx.seed}, heads_done)
    if heads_done:
        heads = load_heads(paths.final, teacher, meta, heads)
    return heads, student_done
