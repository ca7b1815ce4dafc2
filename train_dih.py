"""``--training_type dih``: the teacher and its fine-tuned heads co-teach the student with summed KD."""
from dih_utils import Cohort, fingerprint, heads_meta, load_heads, mount_shapes
from errors import UserError
from model_loading import load_teacher
from registry import STUDENT_KEYS, TrainingType
from run_context import RunContext
from run_outputs import RunPaths, claim_outputs
from train_kd import Distillation, distil


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
    return distil(ctx, teacher, heads, models.student, paths, "dih", done)


def bench_dih(parts) -> Distillation:
    """One DIH step from the bench's teacher and heads."""
    m = parts.cfg.models
    return Distillation(parts.student(), {}, Cohort(parts.teacher, parts.heads), m.kd_alpha, m.kd_temperature)


TRAINING_TYPE = TrainingType(
    name="dih", run=train_dih, depends_on=STUDENT_KEYS, needs=frozenset({"teacher", "heads"}), report_order=20,
    frozen_reference=True,
    summary="DIH: the teacher and its k fine-tuned heads co-teach the student (summed KD)", bench=bench_dih)
