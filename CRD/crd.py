"""Contrastive representation distillation (Tian, Krishnan and Isola, ICLR 2020) on the toolkit's loop.

The student's and the teacher's pooled embeddings are projected (linear layer, L2 normalisation) to
``--feat_dim`` dimensions. Two memory banks of one vector per training sample (one bank per side) hold a
momentum average of past embeddings. Each student embedding is contrasted against the teacher bank (its
own sample's entry is the positive, ``--nce_k`` entries of other samples the negatives) and each teacher
embedding against the student bank, with the NCE loss of the paper. The teacher's backbone is frozen; its
projection is trained with the student.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from dih_utils import Cohort
from dihkit.foundations.errors import UserError
from dihkit.methods.feature_baselines import BETA_FLAG, report_extra
from dihkit.foundations.flags import Range, flag
from KD_Loss import soft_kl
from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import load_teacher, model_meta, new_model
from dihkit.foundations.registry import STUDENT_KEYS, TrainingType
from dihkit.runs.run_context import RunContext
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_funcs import run_phase

# The contrastive term's weight when --beta is not given (RepDistiller's CIFAR-100 setting).
DEFAULT_BETA = 0.8


@dataclass(frozen=True)
class CRDSettings:
    """The contrastive term's weight, embedding size, negatives, temperature and memory momentum."""
    beta: float
    feat_dim: int
    nce_k: int
    nce_t: float
    nce_m: float


FLAGS = (
    BETA_FLAG,
    flag("--feat_dim", type=int, default=128, range=Range(1), help="dimension of the contrastive embeddings"),
    flag("--nce_k", type=int, default=16384, range=Range(1),
         help="negatives per sample (capped at the samples outside the largest class)"),
    flag("--nce_t", type=float, default=0.07, range=Range(0, lo_open=True), help="NCE temperature"),
    flag("--nce_m", type=float, default=0.5, range=Range(0, 1, hi_open=True),
         help="momentum of the memory-bank update"),
)

# Added to the denominators of the NCE posteriors so an underflowing score never divides by zero.
NCE_EPS = 1e-7


def nce_loss(probs: torch.Tensor, noise_prob: float) -> torch.Tensor:
    """NCE loss of CRD for unnormalised probabilities ``probs`` (B, K+1); column 0 is the positive.

    With ``m = K * noise_prob``: ``-1/B * sum_b [log(p_b0 / (p_b0 + m)) + sum_{j>=1} log(m / (p_bj + m))]``,
    i.e. the log-posterior that the positive came from the data and each negative from the noise.
    """
    m = (probs.shape[1] - 1) * noise_prob
    positive = probs[:, 0]
    log_d1 = torch.log(positive / (positive + m + NCE_EPS))
    log_d0 = torch.log(m / (probs[:, 1:] + m + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


class Embed(nn.Module):
    """Linear projection of a pooled embedding to ``feat_dim`` dimensions, then L2 normalisation."""

    def __init__(self, dim_in: int, feat_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected embedding."""
        return F.normalize(self.linear(emb), dim=1)


def negatives_available(labels: torch.Tensor) -> int:
    """The fewest negatives any sample has: samples outside its class, for the largest class."""
    return len(labels) - int(torch.bincount(labels).max())


def all_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` concatenated over the ranks of a distributed run (itself in a single process).

    Every rank applies every rank's memory update, so the banks stay identical across ranks.
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class CRDMethod(StudentMethod):
    """CE + alpha * KD + beta * (NCE of the student side + NCE of the teacher side).

    Buffers (saved in the run's checkpoint, not in the exported student): the two memory banks and the
    two normalisation constants Z (negative until estimated from the first batch). The negative
    sampler's random state is the method's extra state, so a resumed run draws the same negatives.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, meta: dict, labels: torch.Tensor, feat_dim: int,
                 nce_k: int, nce_t: float, nce_m: float, alpha: float, beta: float, temperature: float,
                 generator: torch.Generator):
        super().__init__(student, meta)
        self.cohort = Cohort(teacher)
        self.embed_s = Embed(student.embedding_dim, feat_dim)
        self.embed_t = Embed(teacher.embedding_dim, feat_dim)
        self.nce_k, self.nce_t, self.nce_m = nce_k, nce_t, nce_m
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.num_samples = len(labels)
        # The CRD code's initialisation: uniform in [-s, s], s = 1/sqrt(feat_dim/3): unit squared norm on average.
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(self.num_samples, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        # Training indices sorted by class, with each class's block: negatives are drawn outside the block.
        by_class = torch.argsort(labels, stable=True)
        count = torch.bincount(labels)
        self.register_buffer("by_class", by_class, persistent=False)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count, persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        self.generator = generator

    def get_extra_state(self) -> torch.Tensor:
        """The negative sampler's random state (checkpointed with the method)."""
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restore the negative sampler's random state."""
        self.generator.set_state(state)

    def draw_negatives(self, y: torch.Tensor) -> torch.Tensor:
        """``nce_k`` indices per sample, uniform with replacement over the training samples of other classes."""
        start, count = self.class_start[y][:, None], self.class_count[y][:, None]
        outside = self.num_samples - count
        u = torch.rand((len(y), self.nce_k), device=y.device, dtype=torch.float64, generator=self.generator)
        pos = torch.minimum((u * outside).long(), outside - 1)
        pos = pos + (pos >= start) * count  # skip the sample's own class block
        return self.by_class[pos]

    def contrast(self, v: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``exp(v . bank[index] / nce_t) / Z`` (B, K+1); Z is estimated on first use and then kept.

        Scores against the whole bank are one (B, N) product, far smaller than gathering (B, K+1, D)
        bank rows; the bank is copied because ``update_memory`` changes it in place before the backward pass.
        """
        scores = v @ bank.clone().t()
        out = torch.exp(scores.gather(1, index) / self.nce_t)
        with torch.no_grad():
            z.copy_(torch.where(z < 0, out.mean() * self.num_samples, z))
        return out / z

    @torch.no_grad()
    def update_memory(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Momentum update of each sample's entry in both banks, renormalised to unit length."""
        idx, v_s, v_t = all_ranks(idx), all_ranks(v_s), all_ranks(v_t)
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            bank[idx] = F.normalize(bank[idx] * self.nce_m + v * (1 - self.nce_m), dim=1)

    def forward(self, x, y, idx):
        """The CRD objective for one batch and the student's logits."""
        logits, _, emb_s = self.student(x, features=True)
        t_logits, _, emb_t = self.cohort.features(x)
        ce = F.cross_entropy(logits.float(), y)
        kd = soft_kl(logits, t_logits, self.temperature)
        with torch.autocast(x.device.type, enabled=False):
            v_s, v_t = self.embed_s(emb_s.float()), self.embed_t(emb_t.float())
            index = torch.cat([idx[:, None], self.draw_negatives(y)], dim=1)
            noise = 1.0 / self.num_samples
            crd = (nce_loss(self.contrast(v_s, self.memory_t, index, self.z_s), noise)
                   + nce_loss(self.contrast(v_t, self.memory_s, index, self.z_t), noise))
            self.update_memory(idx, v_s.detach(), v_t.detach())
        return ce + self.alpha * kd + self.beta * crd, logits


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (None where the platform cannot tell)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_memory(ctx: RunContext, labels: torch.Tensor) -> int:
    """Print the memory the banks take, refuse a dataset whose banks do not fit; return the negatives per sample."""
    s, n = ctx.cfg.method, len(labels)
    available = negatives_available(labels)
    if available == 0:
        raise UserError("crd needs training samples of at least two classes to draw negatives from")
    k = s.nce_k
    if k > available:
        ctx.say(f"[crd] --nce_k {k} is more than the {available:,} training samples outside the largest class; "
                f"using {available:,} negatives per sample")
        k = available
    banks = 2 * n * s.feat_dim * 4
    scores = 2 * ctx.cfg.data.batch_size * n * 4
    ctx.say(f"[crd] memory banks: 2 x {n:,} samples x {s.feat_dim} float32 = {banks / 2**20:,.1f} MiB on "
            f"{ctx.device} (+ {scores / 2**20:,.1f} MiB of scores per batch); {k:,} negatives per sample")
    free = free_memory(ctx.device)
    if free is not None and banks + scores > free:
        raise UserError(f"crd's memory banks need {(banks + scores) / 2**30:,.2f} GiB for {n:,} training samples, "
                        f"but {ctx.device} has {free / 2**30:,.2f} GiB free; lower --feat_dim or use a smaller dataset")
    return k


def train_crd(ctx: RunContext) -> dict:
    """The student learns the teacher's embedding by contrast, plus KD (``--kd_alpha``) and CE."""
    models, s = ctx.cfg.models, ctx.cfg.method
    beta = s.beta
    labels = ctx.data.train.labels
    nce_k = ctx.dist.check_together(lambda: plan_memory(ctx, labels))  # free memory may differ between ranks
    teacher = load_teacher(ctx)
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    meta = model_meta(ctx, models.student, teacher=models.teacher, kd_alpha=models.kd_alpha,
                      kd_temperature=models.kd_temperature, beta=beta, feat_dim=s.feat_dim, nce_k=nce_k,
                      nce_t=s.nce_t, nce_m=s.nce_m)
    generator = torch.Generator(ctx.device).manual_seed(ctx.dist.rank_seed(ctx.seed))
    method = CRDMethod(new_model(ctx, models.student), teacher, meta, labels.to(ctx.device), s.feat_dim, nce_k,
                       s.nce_t, s.nce_m, models.kd_alpha, beta, models.kd_temperature, generator).to(ctx.device)
    report_extra(ctx, {"embed_s": method.embed_s, "embed_t": method.embed_t})
    return run_phase(method, ctx, paths, ctx.cfg.optim, "crd", meta, done)


def bench_crd(parts) -> CRDMethod:
    """CRD with memory banks as large as the real training set's (the (B, N) scores scale with N)."""
    s, m = parts.cfg.method, parts.cfg.models
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, parts.classes, (parts.n_dataset,), generator=g).to(parts.device)
    nce_k = min(s.nce_k, negatives_available(labels))
    return CRDMethod(parts.student(), parts.teacher, {}, labels, s.feat_dim, nce_k, s.nce_t, s.nce_m, m.kd_alpha,
                     s.beta, m.kd_temperature, torch.Generator(parts.device).manual_seed(2))


def crd_label(flags) -> str:
    """CRD, naming the KD term that --kd_alpha adds (the CRD paper's CRD-only setting is --kd_alpha 0)."""
    alpha = flags.get("kd_alpha", 0)
    return f"CRD+KD (alpha {alpha:g})" if alpha else "CRD"


TRAINING_TYPE = TrainingType(
    name="crd", run=train_crd, flags=FLAGS, flag_defaults={"beta": DEFAULT_BETA}, settings=CRDSettings, needs=frozenset({"teacher"}),
    depends_on=STUDENT_KEYS + tuple(f.dest for f in FLAGS), report_order=60, bench=bench_crd, label=crd_label,
    description=f"contrastive representation distillation: CE + --kd_alpha x KD + --beta x CRD (--beta default "
                f"{DEFAULT_BETA}); --kd_alpha 0 is the CRD paper's CRD-only objective",
    summary="CRD: contrastive representation distillation with memory banks, plus KD (--kd_alpha) and CE")
