"""The authors' DIH step, rebuilt from the method's definition as the bench's reference (and only here).

Written independently of the toolkit's losses and of its frozen ``Cohort``: the teacher and its heads run
with autograd on and the loss back-propagates through them (their gradients accumulate, unused), each
head runs twice, and the loss is the method's definition taken literally: one KD loss per cohort member
(final teacher logits, then each head's), summed, each written with ``torch.nn.functional``:

    alpha * T^2 * KLDiv(log_softmax(s / T), softmax(t / T), batchmean) + (1 - alpha) * CE(s, y)

The toolkit's ``dih`` computes the same objective with the cohort under ``no_grad``, one pass per head
and CE once; ``student_gradient_gap`` compares the student's gradients of the two, which agree only if
both are right.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from dihkit.runs.method_contract import StudentMethod
from train_funcs import forward_loss


def authors_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    alpha: float, temperature: float) -> torch.Tensor:
    """One cohort member's KD loss as the authors compute it (KLDiv on log-probabilities and probabilities).

    In float32, as the authors' code runs: under ``--amp`` the logits arrive in bfloat16.
    """
    t = temperature
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean")
    return alpha * t * t * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


class AuthorsDIH(StudentMethod):
    """The authors' DIH step: the whole cohort in the graph, each head twice, one KD loss per member."""

    def __init__(self, student: nn.Module, teacher: nn.Module, heads: nn.ModuleList, alpha: float,
                 temperature: float):
        super().__init__(student, {})
        # Copies that require gradients, in a plain list: not trained (the optimizer never sees them), not
        # moved by ``.to``, and left in the frozen originals' eval mode.
        self.graph = [copy.deepcopy(m).requires_grad_(True) for m in (teacher, heads)]
        self.alpha, self.temperature = alpha, temperature

    def forward(self, x, y, idx):
        """Student, teacher and heads with autograd on; the heads' first pass is discarded, as the authors'."""
        teacher, heads = self.graph
        logits = self.student(x)
        t_logits, feats, _ = teacher(x, features=True)
        for head, f in zip(heads, feats):
            head(f)
        members = [t_logits] + [head(f) for head, f in zip(heads, feats)]
        loss = sum(authors_kd_loss(logits, t, y, self.alpha, self.temperature) for t in members)
        return loss, logits


def authors_step(parts) -> AuthorsDIH:
    """The authors' step on the bench's teacher and heads with the ``dih`` settings' alpha and temperature."""
    m = parts.cfg.models
    return AuthorsDIH(parts.student(), parts.teacher, parts.heads, m.kd_alpha, m.kd_temperature)


def student_gradient_gap(ours: StudentMethod, authors: AuthorsDIH, batch, ctx) -> float:
    """Largest difference between the student's gradients from our DIH step and the authors' on one batch.

    The authors' student first takes our student's weights and buffers; each step runs as the trainer
    runs it (``forward_loss``: channels-last input, autocast).
    """
    authors.student.load_state_dict(ours.student.state_dict())
    grads = []
    for method in (ours, authors):
        method.zero_grad(set_to_none=True)
        loss, _ = forward_loss(method, *batch, ctx)
        loss.backward()
        grads.append([p.grad for p in method.student.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*grads))
