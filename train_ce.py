"""``--training_type ce``: train a model from scratch with cross-entropy (the teacher, or a student alone)."""
import torch.nn.functional as F

from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import model_meta, new_model
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_funcs import run_phase


class CrossEntropy(StudentMethod):
    """Plain supervised training: cross-entropy on the labels."""

    def forward(self, x, y, idx):
        """CE loss and logits."""
        logits = self.student(x)
        return F.cross_entropy(logits.float(), y), logits


def train_ce(ctx: RunContext) -> dict:
    """Train ``--teacher`` from scratch with cross-entropy."""
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    arch = ctx.cfg.models.teacher
    method = CrossEntropy(new_model(ctx, arch), model_meta(ctx, arch))
    return run_phase(method, ctx, paths, ctx.cfg.optim, "ce", method.meta, done)


TRAINING_TYPE = TrainingType(
    name="ce", run=train_ce, trains="teacher", depends_on=("teacher",), report_order=0,
    summary="train --teacher from scratch with cross-entropy (the teacher, or in a pipeline the student alone)",
    label=lambda flags: "ce (student alone)",
    bench=lambda parts: CrossEntropy(parts.student(), {}))
