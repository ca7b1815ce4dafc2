"""DIH student training: the teacher and its fine-tuned heads co-teach the student with summed KD."""
from dih_utils import fingerprint, heads_meta, load_heads, mount_shapes
from errors import UserError
from train_funcs import RunContext, RunPaths, claim_outputs, distil, load_teacher


def train_dih(ctx: RunContext) -> dict:
    """``--training_type dih``: load the teacher and its heads (checked against it), then distil."""
    args = ctx.args
    if args.saved_intermediates_directory is None:
        raise UserError("dih needs --saved_intermediates_directory (the heads written by --training_type fine_tune)")
    teacher = load_teacher(ctx)
    meta = heads_meta(args.teacher, ctx.info.num_classes, ctx.info.image_size, ctx.info.name,
                      mount_shapes(teacher, ctx.info.image_size), fingerprint(teacher))
    heads = load_heads(args.saved_intermediates_directory, teacher, meta).to(ctx.device)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    return distil(ctx, teacher, heads, args.student, paths, "dih", done)
