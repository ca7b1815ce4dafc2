"""Distillation losses: KD (Hinton et al. 2015) and the DIH cohort loss, as the method defines them; the
logit methods DKD, DIST and logit standardisation, and the cohort loss over any per-member loss
(docs/LOGIT_METHODS.md).

All losses are computed in float32 whatever the autocast dtype of the logits, so mixed precision never
changes softmax, KL or cross-entropy numerics.
"""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch (``batchmean``)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """``alpha * T^2 * KL + (1 - alpha) * CE(s, y)``: alpha weights the distillation term."""
    ce = F.cross_entropy(student_logits.float(), labels)
    return alpha * soft_kl(student_logits, teacher_logits, temperature) + (1.0 - alpha) * ce


def dih_loss(student_logits: torch.Tensor, cohort_logits: list[torch.Tensor], labels: torch.Tensor,
             alpha: float, temperature: float) -> torch.Tensor:
    """Sum of the KD loss over the cohort (final teacher logits and every head's logits).

    Written as ``alpha * T^2 * sum_b KL_b + (k+1) * (1 - alpha) * CE``, which equals the sum of k+1 KD
    losses (the authors' code counts the CE term once per cohort member) but computes CE once.
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    kl = sum(soft_kl(student_logits, t, temperature) for t in cohort_logits)
    return alpha * kl + len(cohort_logits) * (1.0 - alpha) * ce


def smaller_size(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """The smaller height and the smaller width of two maps (..., H, W)."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of a map (N, C, H, W) to ``size``; the map itself when it already has it."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def hint_loss(student_map: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss: ``mean over (n, c, h, w) of (r(F_s) - F_t)^2``, in float32.

    ``student_map`` is the regressed guided-layer output (already with the teacher's channel count);
    maps of different spatial size are compared at the smaller size (adaptive average pooling).
    """
    size = smaller_size(student_map, teacher_hint)
    return F.mse_loss(pool_to(student_map.float(), size), pool_to(teacher_hint.float(), size))


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer's map of a feature map F (N, C, H, W): ``mean_c |F_c|^p``, flattened, L2-normalised."""
    return F.normalize(feat.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], beta: float,
            p: float = 2.0) -> torch.Tensor:
    """``beta * sum over paired maps of mean((a(F_s) - a(F_t))^2)`` (the mean runs over batch and positions).

    The i-th student map is paired with the i-th teacher map. Of a pair of different resolutions the larger
    *feature map* is adaptively average-pooled to the smaller size before its attention map is taken.
    This is RepDistiller's ``distiller_zoo/AT.py`` (also shipped in the DIH authors' repository; mdistiller
    computes the same) and, for maps of one size, Zagoruyko and Komodakis's own code (``beta * sum``); their
    ``|F|^p`` is ``F^p`` there, the same at the p = 2 everyone uses.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"attention transfer pairs maps one to one, got {len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats):
        size = smaller_size(s, t)
        a_s, a_t = attention_map(pool_to(s.float(), size), p), attention_map(pool_to(t.float(), size), p)
        total = total + (a_s - a_t).pow(2).mean()
    return beta * total


# ---------------------------------------------------------------------------------------------------------
# Logit-based methods beyond KD: logit standardisation, DKD, DIST, and the cohort generalisation of DIH.
# Sources and defaults: docs/LOGIT_METHODS.md.
# ---------------------------------------------------------------------------------------------------------

# The logit-standardisation authors' base temperature (``--base-temp`` of their tools/train.py): the default
# temperature of ``--logit_std``, since standardised logits have unit spread whatever the model's scale.
LOGIT_STD_TEMPERATURE = 2.0


def standardize_logits(z: torch.Tensor) -> torch.Tensor:
    """Per-sample Z-score of logits (Sun et al. 2024): ``(z - mean(z)) / (1e-7 + std(z))`` along the class axis.

    ``std`` is the unbiased estimator (``torch.std``'s default, as the authors use); computed in float32.
    The result does not change under ``a * z + b`` for ``a > 0`` (up to the 1e-7 in the denominator).
    """
    z = z.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))


def logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, logit_std: bool):
    """The two logit tensors in float32, standardised when ``logit_std`` is set: what every distillation
    term with a temperature softmax compares."""
    if logit_std:
        return standardize_logits(student_logits), standardize_logits(teacher_logits)
    return student_logits.float(), teacher_logits.float()


def kd_kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
               logit_std: bool = False) -> torch.Tensor:
    """KD's distillation term ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (batchmean), optionally standardised.

    With ``logit_std`` both sides are standardised before the temperature softmax; without it this is
    exactly :func:`soft_kl`.
    """
    if not logit_std:
        return soft_kl(student_logits, teacher_logits, temperature)
    s, t = logit_pair(student_logits, teacher_logits, True)
    return soft_kl(s, t, temperature)


def kd_loss_ls(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               alpha: float, temperature: float, *, logit_std: bool = False) -> torch.Tensor:
    """:func:`kd_loss` with the logit-standardisation switch: ``alpha * kd_kl_term + (1 - alpha) * CE(s, y)``.

    CE always sees the raw student logits. With ``logit_std=False`` the result equals :func:`kd_loss` bit for bit.
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    return alpha * kd_kl_term(student_logits, teacher_logits, temperature, logit_std=logit_std) + (1.0 - alpha) * ce


def _binary_log_probs(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """``log [p_target, p_others]`` of ``softmax(logits)`` per sample, as an (N, 2) tensor (log-sum-exp form)."""
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    log_gt = torch.logsumexp(logits.masked_fill(~target_mask, float("-inf")), dim=1, keepdim=True)
    log_rest = torch.logsumexp(logits.masked_fill(target_mask, float("-inf")), dim=1, keepdim=True)
    return torch.cat([log_gt, log_rest], dim=1) - log_z


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float, *, logit_std: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two parts (Zhao et al. 2022), each already times ``T^2`` and averaged over the batch.

    TCKD: KL between teacher and student binary distributions ``[p_target, 1 - p_target]`` of
    ``softmax(z/T)``. NCKD: KL between the softmaxes of ``z/T`` over the non-target classes only (the
    target class removed, which is what mdistiller's ``-1000`` mask amounts to). KL is
    ``KL(teacher || student)``, summed over classes and divided by the batch size. ``logit_std``
    standardises both sides first. Needs at least 2 classes for TCKD and 3 for a non-trivial NCKD.
    """
    s, t = logit_pair(student_logits, teacher_logits, logit_std)
    s, t = s / temperature, t / temperature
    target = F.one_hot(labels, s.shape[1]).bool()
    tckd = F.kl_div(_binary_log_probs(s, target), _binary_log_probs(t, target), reduction="batchmean", log_target=True)
    n, c = s.shape
    s_rest, t_rest = s[~target].view(n, c - 1), t[~target].view(n, c - 1)
    nckd = F.kl_div(F.log_softmax(s_rest, dim=1), F.log_softmax(t_rest, dim=1), reduction="batchmean", log_target=True)
    scale = temperature * temperature
    return tckd * scale, nckd * scale


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
             beta: float, temperature: float, warmup_factor: float = 1.0, *, logit_std: bool = False) -> torch.Tensor:
    """DKD's distillation part: ``warmup_factor * (alpha * TCKD + beta * NCKD)`` (see :func:`dkd_terms`).

    No cross-entropy here: the method adds ``ce_weight * CE(s, y)`` itself (mdistiller: weight 1.0).
    ``warmup_factor`` is :func:`dkd_warmup_factor` of the epoch.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature, logit_std=logit_std)
    return warmup_factor * (alpha * tckd + beta * nckd)


def dkd_warmup_factor(epoch, warmup: int):
    """mdistiller's linear ramp ``min(epoch / warmup, 1)``, with ``epoch`` counted from 1 (a 0-based loop passes
    ``epoch + 1``): 1/warmup in the first epoch, 1.0 from epoch ``warmup`` on; 1.0 when ``warmup <= 0``.

    ``epoch`` may be a number or a 0-d tensor; a tensor gives a tensor on its device (no host sync).
    """
    if warmup <= 0:
        return 1.0
    ramp = epoch / warmup
    return ramp.clamp(max=1.0) if torch.is_tensor(ramp) else min(ramp, 1.0)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: centred cosine, ``eps`` added
    to the product of the norms (as the DIST authors do)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
               logit_std: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's (Huang et al. 2022) inter- and intra-class losses, each times ``tau^2``.

    With ``y = softmax(z / tau)`` for student and teacher, inter = ``1 - mean over samples of
    Pearson(y_s[i, :], y_t[i, :])`` and intra = ``1 - mean over classes of Pearson(y_s[:, j], y_t[:, j])``.
    ``logit_std`` standardises both sides first (an extension: the DIST authors have no such switch).
    """
    s, t = logit_pair(student_logits, teacher_logits, logit_std)
    y_s, y_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    scale = temperature * temperature
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * scale, intra * scale


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float, *, logit_std: bool = False) -> torch.Tensor:
    """DIST's distillation part ``beta * inter + gamma * intra`` (see :func:`dist_terms`); no CE, the method adds it."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature, logit_std=logit_std)
    return beta * inter + gamma * intra


@dataclass(frozen=True)
class MemberLoss:
    """One cohort member's objective ``distill_weight * distill(s, t, y) + ce_weight * CE(s, y)``.

    Calling it gives that value for one teacher member; :func:`cohort_loss` uses the parts to sum the
    distillation terms over the cohort and compute CE once (counted once per member).
    """
    distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    distill_weight: float
    ce_weight: float

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(student_logits.float(), labels)
        return self.distill_weight * self.distill(student_logits, teacher_logits, labels) + self.ce_weight * ce


def cohort_loss(student_logits: torch.Tensor, cohort_logits: list[torch.Tensor], labels: torch.Tensor,
                member_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """DIH generalised: the sum over the cohort (final teacher logits and every head's) of one member's loss.

    ``member_loss(student, teacher_member, labels)`` is the per-member objective. For a :class:`MemberLoss`
    this is computed as ``distill_weight * sum_b distill_b + (k+1) * ce_weight * CE`` (the same sum, CE
    computed once), which with :func:`kd_member` is :func:`dih_loss` bit for bit; any other callable is
    summed member by member.
    """
    if not cohort_logits:
        raise ValueError("the cohort needs at least one member")
    if not isinstance(member_loss, MemberLoss):
        return sum(member_loss(student_logits, t, labels) for t in cohort_logits)
    ce = F.cross_entropy(student_logits.float(), labels)
    distill = sum(member_loss.distill(student_logits, t, labels) for t in cohort_logits)
    return member_loss.distill_weight * distill + len(cohort_logits) * member_loss.ce_weight * ce


def _kd_distill(s, t, y, *, temperature, logit_std):
    """KD member's distillation term (labels unused); module-level so that a MemberLoss pickles."""
    return kd_kl_term(s, t, temperature, logit_std=logit_std)


def _dkd_distill(s, t, y, *, alpha, beta, temperature, logit_std):
    """DKD member's distillation term without warm-up (the MemberLoss weight carries it)."""
    return dkd_loss(s, t, y, alpha, beta, temperature, 1.0, logit_std=logit_std)


def _dist_distill(s, t, y, *, beta, gamma, temperature, logit_std):
    """DIST member's distillation term (labels unused)."""
    return dist_loss(s, t, beta, gamma, temperature, logit_std=logit_std)


def kd_member(alpha: float, temperature: float, *, logit_std: bool = False) -> MemberLoss:
    """KD per member: ``alpha * T^2 * KL + (1 - alpha) * CE`` (DIH's own loss; optionally standardised)."""
    return weighted_kd_member(alpha, 1.0 - alpha, temperature, logit_std=logit_std)


def weighted_kd_member(kd_weight: float, ce_weight: float, temperature: float, *,
                       logit_std: bool = False) -> MemberLoss:
    """KD per member with separate weights, ``kd_weight * T^2 * KL + ce_weight * CE`` (mdistiller's
    KD_WEIGHT/CE_WEIGHT: 0.9 and 0.1; logit standardisation's runs: 9 and 0.1)."""
    distill = partial(_kd_distill, temperature=temperature, logit_std=logit_std)
    return MemberLoss(distill, kd_weight, ce_weight)


def dkd_member(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, *, warmup_factor: float = 1.0,
               ce_weight: float = 1.0, logit_std: bool = False) -> MemberLoss:
    """DKD per member: ``warmup_factor * (alpha * TCKD + beta * NCKD) + ce_weight * CE`` (mdistiller defaults)."""
    distill = partial(_dkd_distill, alpha=alpha, beta=beta, temperature=temperature, logit_std=logit_std)
    return MemberLoss(distill, warmup_factor, ce_weight)


def dist_member(beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, *, ce_weight: float = 1.0,
                logit_std: bool = False) -> MemberLoss:
    """DIST per member: ``beta * inter + gamma * intra + ce_weight * CE`` (defaults: the authors' loss class)."""
    distill = partial(_dist_distill, beta=beta, gamma=gamma, temperature=temperature, logit_std=logit_std)
    return MemberLoss(distill, 1.0, ce_weight)
