"""``--training_type dih``: the teacher and its fine-tuned heads co-teach the student, one member loss each, summed.

``--cohort_loss kd`` (the default) is the method's own loss, ``KD_Loss.dih_loss`` bit for bit; ``dkd`` and
``dist`` sum DKD's or DIST's member loss over the cohort instead, with the flags of those types.
"""
from dataclasses import dataclass

from dih_utils import fingerprint, heads_meta, load_heads, mount_shapes
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import flag
from dihkit.runs.model_loading import load_teacher
from dihkit.foundations.registry import STUDENT_KEYS, WEIGHT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_dist import DISTSettings, dist_objective
from train_dist import FLAGS as DIST_FLAGS
from train_dkd import DKDSettings, dkd_objective
from train_dkd import FLAGS as DKD_FLAGS
from train_kd import Objective, bench_distillation, distil, kd_objective, weights_label, with_ls


@dataclass(frozen=True)
class DIHSettings(DKDSettings, DISTSettings):
    """The member loss of the cohort, with the flags of every member loss it can be."""
    cohort_loss: str


# Each member loss from the run's models and DIH's settings.
OBJECTIVES = {
    "kd": lambda models, s: kd_objective(models, s.logit_std),
    "dkd": dkd_objective,
    "dist": dist_objective,
}

FLAGS = (
    flag("--cohort_loss", default="kd", choices=list(OBJECTIVES),
         help="each cohort member's loss: kd (DIH's own), dkd or dist (their flags in the groups dkd and dist; "
              "the temperature stays --kd_temperature: DIH's 5, or 2 with --logit_std)"),
)


def dih_objective(models, s: DIHSettings) -> Objective:
    """The member loss ``--cohort_loss`` names."""
    return OBJECTIVES[s.cohort_loss](models, s)


def train_dih(ctx: RunContext) -> dict:
    """Load the teacher and its heads (checked against it), then distil from the whole cohort."""
    models, info = ctx.cfg.models, ctx.info
    if models.heads_dir is None:
        raise UserError("dih needs --saved_intermediates_directory (the heads written by --training_type fine_tune)")
    teacher = load_teacher(ctx)
    meta = heads_meta(models.teacher, info.num_classes, info.image_size, info.name,
                      mount_shapes(teacher, info.image_size), fingerprint(teacher))
    heads = load_heads(models.heads_dir, teacher, meta).to(ctx.device)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    s = ctx.cfg.method
    return distil(ctx, teacher, heads, models.student, paths, "dih", done, objective=dih_objective(models, s),
                  cohort_loss=s.cohort_loss)


def dih_label(flags) -> str:
    """``dih`` for DIH's own loss, ``DIH[DKD]`` or ``DIH[DIST]`` for another member loss; ``+LS`` with
    standardised logits."""
    loss = flags.get("cohort_loss") or "kd"
    return weights_label("dih", flags) if loss == "kd" else with_ls(f"DIH[{loss.upper()}]", flags)


TRAINING_TYPE = TrainingType(
    name="dih", run=train_dih, flags=FLAGS, settings=DIHSettings, needs=frozenset({"teacher", "heads"}),
    depends_on=STUDENT_KEYS + WEIGHT_KEYS + ("logit_std", "cohort_loss") + tuple(f.dest for f in DKD_FLAGS + DIST_FLAGS),
    report_order=20, frozen_reference=True, label=dih_label,
    bench=lambda parts: bench_distillation(parts, dih_objective(parts.cfg.models, parts.cfg.method), parts.heads),
    summary="DIH: the teacher and its k fine-tuned heads co-teach the student (summed KD, or --cohort_loss)")
