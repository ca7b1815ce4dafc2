"""``--training_type fine_tune``: the teacher's k intermediate heads, trained jointly on its frozen backbone."""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dih_utils import Cohort, build_heads, fingerprint, heads_meta, mount_shapes, save_heads
from dihkit.runs.method_contract import Method
from dihkit.runs.model_loading import load_teacher
from models_repo import count_parameters
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_funcs import run_phase


class HeadTuning(Method):
    """Fine-tune the intermediate heads of a frozen teacher: CE on each head, summed."""

    def __init__(self, teacher: nn.Module, heads: nn.ModuleList, heads_meta: dict):
        super().__init__()
        self.heads = heads
        self.cohort = Cohort(teacher)
        self.heads_meta = heads_meta

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head from one frozen teacher pass."""
        _, feats, _ = self.cohort.features(x)
        return [head(f) for head, f in zip(self.heads, feats)]

    def forward(self, x, y, idx):
        """Sum of the heads' CE losses; the deepest head's logits for training accuracy."""
        logits = self.head_logits(x)
        return sum(F.cross_entropy(l.float(), y) for l in logits), logits[-1]

    def evaluate(self, x):
        """Every head's logits."""
        return {f"head_{i}": l for i, l in enumerate(self.head_logits(x), start=1)}

    def export(self, path: Path, meta: dict) -> None:
        """``head_1.pth`` ... ``head_k.pth`` in the directory ``path``."""
        save_heads(self.heads, path, self.heads_meta, epoch=meta["epoch"], selected_on=meta["selected_on"],
                   seed=meta["seed"])


def fine_tune(ctx: RunContext) -> dict:
    """Train the teacher's k heads jointly on its frozen backbone into the folder ``--path_to_save``."""
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out, is_dir=True)
    done, = claim_outputs(ctx, [paths])
    arch, info = ctx.cfg.models.teacher, ctx.info
    meta = heads_meta(arch, info.num_classes, info.image_size, info.name, mount_shapes(teacher, info.image_size),
                      fingerprint(teacher))
    heads = build_heads(teacher, info.num_classes, info.image_size).to(ctx.device)
    # The printed loss is often in the hundreds or thousands; say why before a user takes it for divergence.
    ctx.say(f"[fine_tune] {len(heads)} heads on {arch}: " + ", ".join(f"{count_parameters(h):,}" for h in heads)
            + f" parameters; the loss shown is the sum of the {len(heads)} heads' cross-entropies, each head one "
              f"linear layer on a flattened feature map of up to {max(h.fc.in_features for h in heads):,} features, "
              "so it can start in the thousands (docs/METHODS.md#head-fine-tuning)")
    method = HeadTuning(teacher, heads, meta)
    return run_phase(method, ctx, paths, ctx.cfg.optim, "fine_tune", {**meta, "seed": ctx.seed}, done)


TRAINING_TYPE = TrainingType(
    name="fine_tune", run=fine_tune, trains="teacher", depends_on=("teacher",), output_is_dir=True,
    outputs=lambda out, flags: [(Path(out), True)], needs=frozenset({"teacher"}), in_pipeline=False,
    report_order=1, summary="train the teacher's intermediate heads on its frozen backbone (a folder of heads)",
    bench=lambda parts: HeadTuning(parts.teacher, build_heads(parts.teacher, parts.classes, parts.size), {}))
