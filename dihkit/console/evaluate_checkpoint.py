"""``--training_type test``: top-1/top-5 of a saved model (and its heads) on the test split."""
from dih_utils import Cohort, fingerprint, heads_meta, load_heads, mount_shapes
from dihkit.files.checkpoints import file_arch
from dihkit.foundations.errors import UserError
from dihkit.runs.evaluation import evaluate_outputs
from dihkit.runs.model_loading import load_trained
from dihkit.runs.run_context import RunContext


def evaluate_saved(ctx: RunContext) -> dict:
    """Evaluate ``--saved_path`` (its architecture read from the file) and ``--saved_intermediates_directory``."""
    models = ctx.cfg.models
    if models.saved_path is None:
        raise UserError("test needs --saved_path (the model to evaluate)")
    arch = file_arch(models.saved_path, "checkpoint", models.teacher)
    model, _ = load_trained(ctx, arch, models.saved_path, "checkpoint")
    heads = None
    if models.heads_dir:
        info = ctx.info
        hmeta = heads_meta(arch, info.num_classes, info.image_size, info.name, mount_shapes(model, info.image_size),
                           fingerprint(model))
        heads = load_heads(models.heads_dir, model, hmeta).to(ctx.device)
    cohort = Cohort(model, heads)

    def outputs(x):
        logits = cohort(x)
        return {arch: logits[0], **{f"head_{i}": h for i, h in enumerate(logits[1:], start=1)}}

    metrics = evaluate_outputs(outputs, ctx.data.test, ctx)
    ctx.say(f"{'model':<12} {'top-1':>7} {'top-5':>7}")
    for name, m in metrics.items():
        ctx.say(f"{name:<12} {m['top1']:7.2f} {m['top5']:7.2f}")
    first = next(iter(metrics.values()))
    return {"test_top1": first["top1"], "test_top5": first["top5"], "final_test": metrics}
