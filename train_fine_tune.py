"""``--training_type fine_tune``: the teacher's k intermediate heads, trained jointly on its frozen backbone.

``--head_selection lowest_val_loss`` keeps each head at its own epoch of lowest loss on the validation split,
as the DIH authors' ``train_regular_middle_logits`` does (they validate on the test split; this never does);
``last`` keeps the last epoch.
"""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dih_utils import FLATTEN, Cohort, build_heads, fingerprint, heads_meta, mount_shapes, save_heads
from dihkit.foundations.errors import UserError
from dihkit.runs.method_contract import Method
from dihkit.runs.model_loading import load_teacher
from models_repo import count_parameters
from dihkit.foundations.flags import flag
from dihkit.foundations.registry import TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from dihkit.foundations.settings import Settings
from train_funcs import run_phase


SELECTIONS = ("last", "lowest_val_loss")
FLAGS = (
    flag("--head_selection", default="last", choices=list(SELECTIONS),
         help="which epoch each head is kept at: last, or lowest_val_loss (each head at its own epoch of lowest "
              "cross-entropy on the validation split; needs --val_size; the dih recipe's choice when --val_size "
              "is given)"),
)


@dataclass(frozen=True)
class FineTuneSettings:
    """Which epoch of each head the heads folder keeps."""
    head_selection: str


class HeadTuning(Method):
    """Fine-tune the intermediate heads of a frozen teacher: CE on each head, summed.

    With ``lowest_val_loss`` a frozen copy of each head (``kept``) follows that head's lowest validation loss;
    it is a submodule with buffers, so a resumed run's checkpoint carries it.
    """

    def __init__(self, teacher: nn.Module, heads: nn.ModuleList, heads_meta: dict, selection: str = "last"):
        super().__init__()
        self.heads = heads
        self.cohort = Cohort(teacher)
        self.heads_meta = heads_meta
        self.selection = selection
        if selection == "lowest_val_loss":
            self.kept = copy.deepcopy(heads).requires_grad_(False)
            self.register_buffer("kept_loss", torch.full((len(heads),), float("inf")))
            self.register_buffer("kept_epoch", torch.zeros(len(heads), dtype=torch.long))

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

    @torch.no_grad()
    def observe_validation(self, epoch: int, metrics: dict) -> None:
        """Keep a copy of every head whose validation loss is its lowest so far (``lowest_val_loss``)."""
        if self.selection != "lowest_val_loss":
            return
        for i, (head, kept) in enumerate(zip(self.heads, self.kept)):
            loss = metrics[f"head_{i + 1}"]["loss"]
            if loss < self.kept_loss[i].item():
                kept.load_state_dict(head.state_dict())
                self.kept_loss[i], self.kept_epoch[i] = loss, epoch

    def export(self, path: Path, meta: dict) -> None:
        """``head_1.pth`` ... ``head_k.pth`` in the directory ``path``; the final folder of ``lowest_val_loss``
        holds the kept heads, each recording its epoch and validation loss."""
        heads, selected, per_head = self.heads, meta["selected_on"], None
        if self.selection == "lowest_val_loss" and selected == "last epoch":
            heads, selected = self.kept, "lowest validation loss, per head"
            per_head = [{"head_epoch": int(e), "head_val_loss": float(l)}
                        for e, l in zip(self.kept_epoch.tolist(), self.kept_loss.tolist())]
        save_heads(heads, path, self.heads_meta, per_head, epoch=meta["epoch"], selected_on=selected,
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
    widest = max(h.fc.in_features for h in heads)
    reads = (f"a flattened feature map of up to {widest:,} features, so it can start in the thousands "
             "(docs/METHODS.md#head-fine-tuning)" if heads[0].form == FLATTEN else
             f"a feature map average-pooled first ({heads[0].form}, up to {widest:,} features; "
             "docs/IMAGENET.md#heads-that-pool)")
    ctx.say(f"[fine_tune] {len(heads)} heads on {arch}: " + ", ".join(f"{count_parameters(h):,}" for h in heads)
            + f" parameters; the loss shown is the sum of the {len(heads)} heads' cross-entropies, each head one "
              f"linear layer on {reads}")
    method = HeadTuning(teacher, heads, meta, ctx.cfg.method.head_selection)
    return run_phase(method, ctx, paths, ctx.cfg.optim, "fine_tune", {**meta, "seed": ctx.seed}, done)


def check_selection(cfg: Settings) -> None:
    """Before any data: a selection on the validation split needs one."""
    if cfg.method.head_selection == "lowest_val_loss" and cfg.data.val_size == 0:
        raise UserError("--head_selection lowest_val_loss selects on the validation split, never the test split: "
                        "give --val_size (images held out of the training set)")


TRAINING_TYPE = TrainingType(
    name="fine_tune", run=fine_tune, trains="teacher", depends_on=("teacher", "head_selection"), output_is_dir=True,
    flags=FLAGS, settings=FineTuneSettings,
    outputs=lambda out, flags: [(Path(out), True)], needs=frozenset({"teacher"}), in_pipeline=False,
    pre_data_check=check_selection,
    report_order=1, summary="train the teacher's intermediate heads on its frozen backbone (a folder of heads)",
    bench=lambda parts: HeadTuning(parts.teacher, build_heads(parts.teacher, parts.classes, parts.size), {}))
