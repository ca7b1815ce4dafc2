"""Task-oriented feature distillation (Zhang et al., NeurIPS 2020) on the toolkit's loop.

Teacher and student carry one auxiliary classifier at each stage but the last; each resembles the rest
of its backbone from that stage (the remaining stages, the tail, pooling and a linear layer), so its last
feature map is "task-oriented": trained for the classification task. The teacher's classifiers are
fine-tuned on the frozen teacher first. Classifier i of the student (the final classifier counting as
the k-th) then learns from classifier i of the teacher: CE, KD on the logits, and an L2 loss between
their last feature maps through a linear link, whose weights are kept near-orthogonal.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dih_utils import Cohort
from feature_baselines import report_extra, require_same_stages, resolve_beta, teacher_heads
from KD_Loss import soft_kl
from models_repo import build_model
from train_funcs import OptimConfig, RunContext, RunPaths, StudentMethod, load_teacher, model_meta, new_model, run_phase


def trunk(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every stage of a registry model."""
    feats = []
    x = net.stem(x)
    for stage in net.stages:
        x = stage(x)
        feats.append(x)
    return feats


def finish(net: nn.Module, feat: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``net``'s stages from ``start`` on, its tail, pooling and classifier: (logits, last feature map)."""
    for stage in net.stages[start:]:
        feat = stage(feat)
    fmap = net.tail(feat)
    return net.fc(torch.flatten(net.pool(fmap), 1)), fmap


class AuxClassifier(nn.Module):
    """Classifier on stage ``index``'s output shaped like the rest of the backbone after it.

    Its modules are taken from a fresh model of the same architecture: the stages after ``index``, the
    tail, the pooling and the linear classifier.
    """

    def __init__(self, arch: str, num_classes: int, index: int):
        super().__init__()
        fresh = build_model(arch, num_classes)
        self.stages = nn.ModuleList(fresh.stages[index + 1:])
        self.tail, self.pool, self.fc = fresh.tail, fresh.pool, fresh.fc

    def forward(self, feat: torch.Tensor, features: bool = False):
        """Logits, or with ``features=True`` (logits, last feature map)."""
        logits, fmap = finish(self, feat, 0)
        return (logits, fmap) if features else logits


def build_aux(arch: str, num_classes: int) -> nn.ModuleList:
    """One auxiliary classifier after each stage of ``arch`` but the last."""
    k = build_model(arch, num_classes).num_stages
    return nn.ModuleList(AuxClassifier(arch, num_classes, i) for i in range(k - 1))


def classifier_outputs(net: nn.Module, aux: nn.ModuleList, x: torch.Tensor) -> list:
    """(logits, last feature map) of every auxiliary classifier, stage by stage, then of the final classifier."""
    feats = trunk(net, x)
    return [a(f, features=True) for a, f in zip(aux, feats)] + [finish(net, feats[-1], net.num_stages)]


@torch.no_grad()
def map_shapes(net: nn.Module, aux: nn.ModuleList, image_size: int) -> list[tuple[int, ...]]:
    """Shapes (C, H, W) of every classifier's last feature map, from a dry run in eval mode."""
    modes = [m.training for m in (net, aux)]
    for m in (net, aux):
        m.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device)
    shapes = [tuple(fmap.shape[1:]) for _, fmap in classifier_outputs(net, aux, x)]
    for m, mode in zip((net, aux), modes):
        m.train(mode)
    return shapes


def build_links(student_shapes, teacher_shapes) -> nn.ModuleList:
    """Per classifier pair, a bias-free 1x1 convolution from the student's width to the teacher's (identity if equal)."""
    return nn.ModuleList(nn.Identity() if s[0] == t[0] else nn.Conv2d(s[0], t[0], 1, bias=False)
                         for s, t in zip(student_shapes, teacher_shapes))


def orthogonality_loss(weight: torch.Tensor) -> torch.Tensor:
    """``||G - I||_F^2`` for the smaller Gram matrix G of a link's (out, in) weight.

    G = W W^T when out <= in, else W^T W: the one that can equal the identity (a semi-orthogonal link),
    so the loss can reach zero whichever width is larger.
    """
    w = weight.flatten(1).float()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    return (gram - torch.eye(gram.shape[0], device=gram.device)).pow(2).sum()


def match_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever map is spatially larger down to the other's size."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


class TOFDMethod(StudentMethod):
    """Sum over classifier pairs of CE + KD + alpha * feature L2, plus beta * the links' orthogonality loss.

    ``cohort`` holds the frozen teacher with its fine-tuned auxiliary classifiers as heads; the student's
    auxiliary classifiers and the links are trained and saved with the student.
    """

    def __init__(self, student: nn.Module, aux: nn.ModuleList, links: nn.ModuleList, meta: dict, cohort: Cohort,
                 alpha: float, beta: float, temperature: float):
        super().__init__(student, meta)
        self.aux, self.links = aux, links
        self.cohort = cohort
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, x, y, idx):
        """The TOFD objective for one batch and the student's final logits."""
        student = classifier_outputs(self.student, self.aux, x)
        with torch.no_grad():
            teacher = classifier_outputs(self.cohort.teacher, self.cohort.heads, x)
        loss = 0.0
        for (s_logits, s_map), (t_logits, t_map), link in zip(student, teacher, self.links, strict=True):
            s_map, t_map = match_size(link(s_map), t_map)
            loss = loss + (F.cross_entropy(s_logits.float(), y) + soft_kl(s_logits, t_logits, self.temperature)
                           + self.alpha * F.mse_loss(s_map.float(), t_map.float()))
        orth = sum(orthogonality_loss(link.weight) for link in self.links if isinstance(link, nn.Conv2d))
        return loss + self.beta * orth, student[-1][0]


def train_tofd(ctx: RunContext) -> dict:
    """``--training_type tofd``: fine-tune (or reuse) the teacher's auxiliary classifiers, then train the student."""
    args, classes, size = ctx.args, ctx.info.num_classes, ctx.info.image_size
    beta = resolve_beta(args)
    require_same_stages(ctx)
    teacher = load_teacher(ctx)
    student = new_model(ctx, args.student)
    aux = build_aux(args.student, classes).to(ctx.device)
    teacher_aux = build_aux(args.teacher, classes).to(ctx.device)
    links = build_links(map_shapes(student, aux, size), map_shapes(teacher, teacher_aux, size)).to(ctx.device)
    paths = RunPaths.for_output(ctx.out)
    teacher_aux, done = teacher_heads(ctx, teacher, teacher_aux, args.saved_tofd_directory, paths)
    meta = model_meta(ctx, args.student, teacher=args.teacher, kd_alpha=args.kd_alpha,
                      kd_temperature=args.kd_temperature, beta=beta, num_aux=len(aux))
    method = TOFDMethod(student, aux, links, meta, Cohort(teacher, teacher_aux), args.kd_alpha, beta,
                        args.kd_temperature)
    report_extra(ctx, {"aux": aux, "links": links})
    return run_phase(method, ctx, paths, OptimConfig.from_args(args), "tofd", meta, done)
