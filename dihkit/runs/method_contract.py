"""The contract every training type implements: a ``Method`` owns what it trains and returns ``(loss, logits)``.

Frozen modules (teacher, heads during DIH) are held in a ``Cohort`` outside the module tree, so the
optimizer, state dicts, ``.train()`` and DDP never touch them; the trainer (``train_funcs``) runs any Method.
"""
from pathlib import Path

import torch
from torch import nn

from dihkit.files.checkpoints import atomic_save, model_record


class Method(nn.Module):
    """Base of every training type: registered submodules are trained; the cohort is frozen."""

    cohort = None  # a dih_utils.Cohort when the method distils from frozen models
    # True for a method some of whose trained parameters get no gradient in a step (DDP must then look
    # for them after every backward, which costs time; without it DDP stops with an error).
    find_unused_parameters = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """Return ``(loss, logits)`` for one training batch."""
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor) -> dict:
        """Named logits of the models being trained, for accuracy."""
        raise NotImplementedError

    def export(self, path: Path, meta: dict) -> None:
        """Write the trained model(s) to ``path`` (a file, or a directory for heads)."""
        raise NotImplementedError

    def observe_validation(self, epoch: int, metrics: dict) -> None:
        """Called after each epoch's validation (``metrics``: ``evaluate``'s outputs by name); keeps nothing here."""

    def reference(self, x: torch.Tensor) -> dict:
        """Named logits of the frozen cohort (teacher, heads), evaluated once per run on the test split."""
        logits = self.cohort(x)
        return {"teacher": logits[0], **{f"head_{i}": h for i, h in enumerate(logits[1:], start=1)}}


class StudentMethod(Method):
    """A method that trains one student model (plus optional extra modules saved with it)."""

    def __init__(self, student: nn.Module, meta: dict):
        super().__init__()
        self.student = student
        self.meta = meta

    def evaluate(self, x: torch.Tensor) -> dict:
        """The student's logits."""
        return {"student": self.student(x)}

    def export(self, path: Path, meta: dict) -> None:
        """The student's model file; extra modules (regressors, links, ...) ride along under ``extra``."""
        extra = {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                 for name, m in self.named_children() if name != "student"}
        atomic_save(model_record(self.student, **meta, extra_modules=extra), path)
