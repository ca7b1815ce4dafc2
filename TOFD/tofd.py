"""Task-oriented feature distillation (Zhang et al., NeurIPS 2020), following the authors' training code.

Teacher and student carry one auxiliary classifier at each stage but the last; each resembles the rest
of its backbone from that stage (the remaining stages, the tail, global pooling and a linear layer), so
its pooled feature vector is "task-oriented": trained for the classification task. The teacher's
classifiers are fine-tuned on the frozen teacher first. Classifier i of the student (the final
classifier counting as the k-th) then learns from classifier i of the teacher, term for term as the
authors' ``distill.py`` does:

    L = sum_i [ CE(s_i, y) + SCE_T(t_i, s_i) + alpha * || link_i(f^s_i) - f^t_i ||_2 ] + beta * sum_i ORTH(link_i)

with f the pooled feature vectors (the input of each classifier's linear layer), link_i a bias-free
linear layer that is always learned (also between equal widths), SCE_T a soft cross-entropy without a
T^2 factor at a temperature growing with the epoch, and ORTH the distance of both Gram matrices of the
link's weight from the identity. docs/TOFD.md sets each term beside the authors' code.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass

from dih_utils import Cohort
from dihkit.methods.epoch_count import CountsEpochs
from dihkit.methods.feature_baselines import BETA_FLAG, heads_outputs, report_extra, require_same_stages, teacher_heads
from dihkit.foundations.flags import flag
from KD_Loss import logit_pair
from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import load_teacher, model_meta, new_model
from models_repo import build_model
from dihkit.foundations.registry import STUDENT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths
from train_funcs import num_train_batches, run_phase
from train_kd import with_ls

# The authors' defaults (distill.py's argparse), used when the flags are not given: the feature-distance
# weight (their --alpha; ours --alpha/--kd_alpha), the orthogonality weight (their and our --beta) and the
# temperature growth t (their --t; ours --temperature/--kd_temperature): T = 1 + t * (epoch + 1) / epochs.
DEFAULT_ALPHA = 0.05
DEFAULT_BETA = 0.03
DEFAULT_TEMPERATURE = 3.0


def trunk(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every stage of a registry model."""
    feats = []
    x = net.stem(x)
    for stage in net.stages:
        x = stage(x)
        feats.append(x)
    return feats


def finish(net: nn.Module, feat: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``net``'s stages from ``start`` on, its tail, pooling and classifier: (logits, pooled feature vector).

    The pooled vector is the input of the linear classifier; it is the feature TOFD distils.
    """
    for stage in net.stages[start:]:
        feat = stage(feat)
    pooled = torch.flatten(net.pool(net.tail(feat)), 1)
    return net.fc(net.dropout(pooled)), pooled


class AuxClassifier(nn.Module):
    """Classifier on stage ``index``'s output shaped like the rest of the backbone after it.

    Its modules are taken from a fresh model of the same architecture: the stages after ``index``, the
    tail, the pooling, the dropout (torchvision's MobileNetV2 has one) and the linear classifier.
    """

    def __init__(self, arch: str, num_classes: int, index: int):
        super().__init__()
        fresh = build_model(arch, num_classes)
        self.stages = nn.ModuleList(fresh.stages[index + 1:])
        self.tail, self.pool, self.dropout, self.fc = fresh.tail, fresh.pool, fresh.dropout, fresh.fc

    def forward(self, feat: torch.Tensor, features: bool = False):
        """Logits, or with ``features=True`` (logits, pooled feature vector)."""
        logits, pooled = finish(self, feat, 0)
        return (logits, pooled) if features else logits


def build_aux(arch: str, num_classes: int) -> nn.ModuleList:
    """One auxiliary classifier after each stage of ``arch`` but the last."""
    k = build_model(arch, num_classes).num_stages
    return nn.ModuleList(AuxClassifier(arch, num_classes, i) for i in range(k - 1))


def classifier_outputs(net: nn.Module, aux: nn.ModuleList, x: torch.Tensor) -> list:
    """(logits, pooled feature vector) of every auxiliary classifier, stage by stage, then of the final classifier."""
    feats = trunk(net, x)
    return [a(f, features=True) for a, f in zip(aux, feats)] + [finish(net, feats[-1], net.num_stages)]


@torch.no_grad()
def map_shapes(net: nn.Module, aux: nn.ModuleList, image_size: int) -> list[tuple[int, ...]]:
    """Shapes ``(D,)`` of every classifier's pooled feature vector, from a dry run in eval mode."""
    modes = [m.training for m in (net, aux)]
    for m in (net, aux):
        m.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device)
    shapes = [tuple(pooled.shape[1:]) for _, pooled in classifier_outputs(net, aux, x)]
    for m, mode in zip((net, aux), modes):
        m.train(mode)
    return shapes


def build_links(student_shapes, teacher_shapes) -> nn.ModuleList:
    """Per classifier pair, a bias-free linear layer from the student's feature width to the teacher's.

    Shapes are the classifiers' feature shapes; only their first entry (the width) is used. The link is
    learned for every pair, also when the two widths are equal (as in the authors' code): a CIFAR ResNet
    teacher and student of the same width still get a trained link with an orthogonality term. It keeps
    PyTorch's default initialisation, as the authors' does.
    """
    return nn.ModuleList(nn.Linear(s[0], t[0], bias=False) for s, t in zip(student_shapes, teacher_shapes, strict=True))


def orthogonality_loss(weight: torch.Tensor) -> torch.Tensor:
    """``||W W^T - I||_F + ||W^T W - I||_F`` for a link's (out, in) weight W.

    Both Gram matrices, each compared with the identity of its size, by the Frobenius norm itself (not
    its square), as ``distill.py`` adds them. For a non-square link the larger Gram matrix cannot equal
    the identity, so the term stays positive there, as it does in the authors' code. Computed in float32,
    outside any autocast region.
    """
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.flatten(1).float()
        eye_out = torch.eye(w.shape[0], device=w.device)
        eye_in = torch.eye(w.shape[1], device=w.device)
        return torch.linalg.matrix_norm(w @ w.t() - eye_out) + torch.linalg.matrix_norm(w.t() @ w - eye_in)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature, *,
                       logit_std: bool = False) -> torch.Tensor:
    """``-sum_c softmax(t/T)_c * log softmax(s/T)_c``, averaged over the batch, in float32.

    The authors' logit-distillation term: a cross-entropy against the teacher's softened distribution
    (so it keeps the teacher's entropy, unlike a KL divergence), with no ``T^2`` factor. ``temperature``
    may be a number or a 0-d tensor. ``logit_std`` standardises both sides first (``--logit_std``).
    """
    s, t = logit_pair(student_logits, teacher_logits, logit_std)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return -(p_t * log_p_s).sum(dim=1).mean()


def feature_distance(linked_student: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """``|| link(f_s) - f_t ||_2`` over the whole batch, in float32.

    The Euclidean norm of the (B, D) difference of pooled feature vectors, taken once over all its
    entries: neither squared nor averaged over the batch (the authors' ``torch.dist(..., p=2)``), so its
    scale grows with the square root of the batch size.
    """
    return torch.linalg.vector_norm(linked_student.float() - teacher_feat.float())


def kd_temperature(t, epoch, epochs: int):
    """The authors' temperature at 0-based ``epoch`` of ``epochs``: ``1 + t * (epoch + 1) / epochs``.

    ``distill.py`` writes ``1 + (t / 250) * (epoch + 1)`` for its 250 epochs: T grows linearly from just
    above 1 in the first epoch to ``1 + t`` in the last. Works on numbers and tensors.
    """
    return 1 + t * (epoch + 1) / epochs


class TOFDMethod(StudentMethod, CountsEpochs):
    """Sum over classifier pairs of CE + soft CE + alpha * feature distance, plus beta * the links' orthogonality.

    ``cohort`` holds the frozen teacher with its fine-tuned auxiliary classifiers as heads; the student's
    auxiliary classifiers and the links are trained and saved with the student. ``temperature`` is the
    authors' ``t``: the distillation temperature of epoch e (0-based) of ``epochs`` is
    ``1 + t * (e + 1) / epochs``. The epoch is counted on the device from the training batches seen
    (``steps_per_epoch`` of them per epoch; ``epoch_count``), so no step waits for the host.
    ``logit_std`` standardises the logits of the soft CE terms (``--logit_std``).
    """

    def __init__(self, student: nn.Module, aux: nn.ModuleList, links: nn.ModuleList, meta: dict, cohort: Cohort,
                 alpha: float, beta: float, temperature: float, *, epochs: int, steps_per_epoch: int,
                 logit_std: bool = False):
        super().__init__(student, meta)
        self.count_epochs(epochs, steps_per_epoch)
        self.aux, self.links = aux, links
        self.cohort = cohort
        self.alpha, self.beta, self.temperature, self.logit_std = alpha, beta, temperature, logit_std

    def current_temperature(self) -> torch.Tensor:
        """The distillation temperature of the epoch the next training batch belongs to (0-d tensor)."""
        return kd_temperature(self.temperature, self.current_epoch().float(), self.epochs)

    def loss_terms(self, student: list, teacher: list, y: torch.Tensor, temperature) -> dict:
        """The unweighted terms, each summed over the classifier pairs: ``ce``, ``kd``, ``feature``, ``orth``."""
        ce = kd = feature = 0.0
        for (s_logits, s_feat), (t_logits, t_feat), link in zip(student, teacher, self.links, strict=True):
            ce = ce + F.cross_entropy(s_logits.float(), y)
            kd = kd + soft_cross_entropy(s_logits, t_logits, temperature, logit_std=self.logit_std)
            feature = feature + feature_distance(link(s_feat), t_feat)
        orth = sum(orthogonality_loss(link.weight) for link in self.links)
        return {"ce": ce, "kd": kd, "feature": feature, "orth": orth}

    def forward(self, x, y, idx):
        """The TOFD objective for one batch and the student's final logits; training batches advance the epoch count."""
        student = classifier_outputs(self.student, self.aux, x)
        with torch.no_grad():
            teacher = classifier_outputs(self.cohort.teacher, self.cohort.heads, x)
        terms = self.loss_terms(student, teacher, y, self.current_temperature())
        self.count_step()
        loss = terms["ce"] + terms["kd"] + self.alpha * terms["feature"] + self.beta * terms["orth"]
        return loss, student[-1][0]


@dataclass(frozen=True)
class TOFDSettings:
    """The orthogonality weight, the teacher's already fine-tuned auxiliary classifiers to reuse, and
    whether the soft CE terms standardise their logits."""
    beta: float
    saved_tofd_directory: str | None
    logit_std: bool


FLAGS = (
    BETA_FLAG,
    flag("--saved_tofd_directory", default=None,
         help="the teacher's fine-tuned auxiliary classifiers to reuse (default: fine-tune them first into "
              "<output stem>_tofd_teacher_aux/)"),
)


def train_tofd(ctx: RunContext) -> dict:
    """Fine-tune (or reuse) the teacher's auxiliary classifiers, then train the student."""
    models, s, classes, size = ctx.cfg.models, ctx.cfg.method, ctx.info.num_classes, ctx.info.image_size
    teacher = load_teacher(ctx)
    student = new_model(ctx, models.student)
    aux = build_aux(models.student, classes).to(ctx.device)
    teacher_aux = build_aux(models.teacher, classes).to(ctx.device)
    links = build_links(map_shapes(student, aux, size), map_shapes(teacher, teacher_aux, size)).to(ctx.device)
    paths = RunPaths.for_output(ctx.out)
    teacher_aux, done = teacher_heads(ctx, teacher, teacher_aux, s.saved_tofd_directory, paths)
    alpha, t = models.kd_alpha, models.kd_temperature
    meta = model_meta(ctx, models.student, teacher=models.teacher, kd_alpha=alpha, kd_temperature=t, beta=s.beta,
                      logit_std=s.logit_std, num_aux=len(aux))
    steps = num_train_batches(len(ctx.data.train), ctx.cfg.data.batch_size, ctx.dist.world_size)
    method = TOFDMethod(student, aux, links, meta, Cohort(teacher, teacher_aux), alpha, s.beta, t,
                        epochs=ctx.cfg.optim.epochs, steps_per_epoch=steps, logit_std=s.logit_std)
    report_extra(ctx, {"aux": aux, "links": links})
    return run_phase(method, ctx, paths, ctx.cfg.optim, "tofd", meta, done)


def bench_tofd(parts) -> TOFDMethod:
    """TOFD with fresh auxiliary classifiers on both sides and the links between their features."""
    student, m = parts.student(), parts.cfg.models
    aux = build_aux(m.student, parts.classes).to(parts.device)
    teacher_aux = parts.frozen(build_aux(m.teacher, parts.classes))
    links = build_links(map_shapes(student, aux, parts.size), map_shapes(parts.teacher, teacher_aux, parts.size))
    return TOFDMethod(student, aux, links, {}, Cohort(parts.teacher, teacher_aux), m.kd_alpha, parts.cfg.method.beta,
                      m.kd_temperature, epochs=parts.cfg.optim.epochs, steps_per_epoch=100,
                      logit_std=parts.cfg.method.logit_std)


TRAINING_TYPE = TrainingType(
    name="tofd", run=train_tofd, flags=FLAGS, settings=TOFDSettings, needs=frozenset({"teacher"}),
    flag_defaults={"kd_alpha": DEFAULT_ALPHA, "beta": DEFAULT_BETA, "kd_temperature": DEFAULT_TEMPERATURE},
    depends_on=STUDENT_KEYS + ("beta", "logit_std"), report_order=70, bench=bench_tofd, same_stages=True,
    pre_data_check=require_same_stages,
    label=lambda flags: with_ls("tofd", flags),
    outputs=lambda out, flags: heads_outputs(out, flags, "saved_tofd_directory"),
    description=f"task-oriented feature distillation as its authors' code: per classifier CE + soft CE + "
                f"--alpha x feature distance, plus --beta x the links' orthogonality; --temperature is the "
                f"growth t of T = 1 + t (epoch+1)/epochs (defaults: --alpha {DEFAULT_ALPHA}, --beta {DEFAULT_BETA}, "
                f"--temperature {DEFAULT_TEMPERATURE}; docs/TOFD.md)",
    summary="TOFD: deep auxiliary classifiers on teacher and student, feature distillation through learned links")
