"""Distillation losses: KD (Hinton et al. 2015) and the DIH cohort loss, as the method defines them.

All losses are computed in float32 whatever the autocast dtype of the logits, so mixed precision never
changes softmax, KL or cross-entropy numerics.
"""
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


def attention_map(feat: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention transfer's map of a feature map F (N, C, H, W): ``mean_c |F_c|^p``, flattened, L2-normalised.

    With ``size`` the (N, H, W) map is adaptively average-pooled to that size before flattening, so
    maps of different resolutions can be compared.
    """
    a = feat.float().abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None:
        a = pool_to(a, size)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], beta: float,
            p: float = 2.0) -> torch.Tensor:
    """``beta / 2 * sum over paired maps of mean((a(F_s) - a(F_t))^2)`` (the mean runs over batch and positions).

    The i-th student map is paired with the i-th teacher map; a pair of different resolutions is
    compared at the smaller one.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"attention transfer pairs maps one to one, got {len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats):
        size = smaller_size(s, t)
        total = total + (attention_map(s, p, size) - attention_map(t, p, size)).pow(2).mean()
    return beta / 2 * total
