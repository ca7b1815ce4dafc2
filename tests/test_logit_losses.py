"""Golden values for logit standardisation, DKD, DIST and the cohort loss.

Every expected value is computed here in float64 with numpy, straight from the methods' formulas
(docs/LOGIT_METHODS.md), never through KD_Loss's helpers; the module (float32) must agree within 1e-6
(relative and absolute). Float32 gets a KL or a Pearson correlation to about 1e-7 absolute, and the
T^2 factor of the temperature-scaled terms multiplies that error, so those terms are compared before
the T^2 scaling (``assert_scaled``): within 1e-6 of the float64 value divided by T^2.
"""
import numpy as np
import pytest
import torch

from KD_Loss import (MemberLoss, cohort_loss, dih_loss, dist_loss, dist_member, dist_terms, dkd_loss, dkd_member,
                     dkd_terms, dkd_warmup_factor, kd_kl_term, kd_loss, kd_loss_ls, kd_member, standardize_logits)

# 3 samples x 5 classes, written by hand.
S = [[1.0, 2.0, 0.5, -1.0, 0.0],
     [0.1, -1.0, 2.0, 1.5, -0.5],
     [3.0, 0.2, -0.4, 0.8, 1.1]]
T1 = [[2.0, 4.0, 0.0, -2.0, 1.0],
      [0.5, 0.5, -0.5, 3.0, 1.0],
      [5.0, -1.0, 0.0, 2.0, 0.5]]
T2 = [[-1.0, 3.0, 1.0, 0.0, 2.5],
      [1.5, -0.5, 0.0, 4.0, -2.0],
      [2.0, 2.0, 1.0, -1.0, 0.0]]
T3 = [[0.0, 1.0, 0.0, 0.0, -3.0],
      [4.0, 1.0, -2.0, 0.5, 2.0],
      [1.0, 0.0, 3.5, 0.2, -0.7]]
Y = [1, 4, 0]
TOL = dict(rel=1e-6, abs=1e-6)


def assert_scaled(got, expected, temp):
    """``got`` equals ``expected`` within 1e-6 once both are divided by ``temp^2`` (the term's own scale)."""
    scale = temp * temp
    assert got / scale == pytest.approx(expected / scale, **TOL)


def t32(rows):
    return torch.tensor(rows, dtype=torch.float32)


def labels():
    return torch.tensor(Y)


# ----------------------------------------------------------------------------- float64 references
def np_softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def np_kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def np_standardize(row):
    row = np.asarray(row, dtype=np.float64)
    mean = row.sum() / len(row)
    std = np.sqrt(((row - mean) ** 2).sum() / (len(row) - 1))
    return (row - mean) / (1e-7 + std)


def prep(rows, logit_std):
    return [np_standardize(r) if logit_std else np.asarray(r, dtype=np.float64) for r in rows]


def np_ce(s_rows, y):
    return sum(-np.log(np_softmax(np.asarray(s, dtype=np.float64))[k]) for s, k in zip(s_rows, y)) / len(s_rows)


def np_kd_term(s_rows, t_rows, temp, logit_std=False):
    s_rows, t_rows = prep(s_rows, logit_std), prep(t_rows, logit_std)
    kl = sum(np_kl(np_softmax(t / temp), np_softmax(s / temp)) for s, t in zip(s_rows, t_rows))
    return temp * temp * kl / len(s_rows)


def np_tckd(s_rows, t_rows, y, temp, logit_std=False):
    total = 0.0
    for s, t, k in zip(prep(s_rows, logit_std), prep(t_rows, logit_std), y):
        ps, pt = np_softmax(s / temp), np_softmax(t / temp)
        total += np_kl(np.array([pt[k], 1.0 - pt[k]]), np.array([ps[k], 1.0 - ps[k]]))
    return temp * temp * total / len(y)


def np_nckd(s_rows, t_rows, y, temp, logit_std=False):
    total = 0.0
    for s, t, k in zip(prep(s_rows, logit_std), prep(t_rows, logit_std), y):
        keep = [j for j in range(len(s)) if j != k]
        total += np_kl(np_softmax(t[keep] / temp), np_softmax(s[keep] / temp))
    return temp * temp * total / len(y)


def np_pearson_mean(a, b):
    """Mean over rows of the centred cosine, with 1e-8 added to the norm product as DIST defines it."""
    vals = []
    for u, v in zip(a, b):
        u, v = u - u.mean(), v - v.mean()
        vals.append(float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8))
    return sum(vals) / len(vals)


def np_dist_terms(s_rows, t_rows, temp, logit_std=False):
    ys = np.array([np_softmax(s / temp) for s in prep(s_rows, logit_std)])
    yt = np.array([np_softmax(t / temp) for t in prep(t_rows, logit_std)])
    inter = 1.0 - np_pearson_mean(ys, yt)
    intra = 1.0 - np_pearson_mean(ys.T, yt.T)
    return temp * temp * inter, temp * temp * intra


# ----------------------------------------------------------------------------- logit standardisation
def test_standardize_exact_value_on_one_vector():
    # mean 4, deviations (-3, -2, -1, 0, 6), unbiased variance 50 / 4 = 12.5.
    z = [1.0, 2.0, 3.0, 4.0, 10.0]
    std = np.sqrt(12.5)
    expected = [d / (1e-7 + std) for d in (-3.0, -2.0, -1.0, 0.0, 6.0)]
    got = standardize_logits(t32([z]))[0].tolist()
    assert got == pytest.approx(expected, **TOL)
    assert got == pytest.approx(np_standardize(z).tolist(), **TOL)


@pytest.mark.parametrize("a,b", [(2.5, -7.0), (0.3, 1.0), (10.0, 100.0)])
def test_standardize_is_invariant_to_positive_affine_maps(a, b):
    z = t32(S)
    assert torch.allclose(standardize_logits(a * z + b), standardize_logits(z), rtol=1e-6, atol=1e-6)


def test_standardize_rows_have_zero_mean_and_unit_unbiased_std():
    out = standardize_logits(t32(T2)).double()
    assert torch.allclose(out.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out.std(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_standardize_computes_in_float32_and_keeps_constant_rows_finite():
    assert standardize_logits(t32(S).half()).dtype == torch.float32
    out = standardize_logits(torch.full((2, 5), 3.0))
    assert torch.equal(out, torch.zeros(2, 5))


# ----------------------------------------------------------------------------- KD with logit standardisation
@pytest.mark.parametrize("temp", [2.0, 4.0])
def test_kd_term_with_logit_std_matches_formula(temp):
    got = kd_kl_term(t32(S), t32(T1), temp, logit_std=True).item()
    assert_scaled(got, np_kd_term(S, T1, temp, logit_std=True), temp)


def test_kd_loss_ls_with_logit_std_matches_formula():
    alpha, temp = 0.9, 2.0
    got = kd_loss_ls(t32(S), t32(T2), labels(), alpha, temp, logit_std=True).item()
    expected = alpha * np_kd_term(S, T2, temp, logit_std=True) + (1 - alpha) * np_ce(S, Y)
    assert got == pytest.approx(expected, **TOL)


@pytest.mark.parametrize("alpha,temp", [(0.1, 5.0), (0.7, 2.0), (1.0, 1.0)])
def test_kd_without_logit_std_is_kd_loss_bit_for_bit(alpha, temp):
    s, t = t32(S), t32(T1)
    assert torch.equal(kd_loss_ls(s, t, labels(), alpha, temp), kd_loss(s, t, labels(), alpha, temp))
    assert torch.equal(kd_kl_term(s, t, temp), kd_kl_term(s, t, temp, logit_std=False))


# ----------------------------------------------------------------------------- DKD
@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("logit_std", [False, True])
def test_dkd_tckd_and_nckd_separately(temp, logit_std):
    tckd, nckd = dkd_terms(t32(S), t32(T1), labels(), temp, logit_std=logit_std)
    assert_scaled(tckd.item(), np_tckd(S, T1, Y, temp, logit_std), temp)
    assert_scaled(nckd.item(), np_nckd(S, T1, Y, temp, logit_std), temp)


def test_dkd_total_with_weights_and_warmup():
    alpha, beta, temp, warm = 1.0, 8.0, 4.0, 0.35
    got = dkd_loss(t32(S), t32(T2), labels(), alpha, beta, temp, warm).item()
    expected = warm * (alpha * np_tckd(S, T2, Y, temp) + beta * np_nckd(S, T2, Y, temp))
    assert got == pytest.approx(expected, **TOL)


def test_dkd_tckd_plus_nckd_weighted_by_teacher_rest_mass_is_kd():
    # The decomposition behind DKD: KD = TCKD + (1 - p_t^target) * NCKD, per sample (batch of one here).
    temp = 3.0
    for i in range(3):
        s, t, y = t32([S[i]]), t32([T1[i]]), torch.tensor([Y[i]])
        tckd, nckd = dkd_terms(s, t, y, temp)
        rest = 1.0 - np_softmax(np.asarray(T1[i]) / temp)[Y[i]]
        assert_scaled((tckd + rest * nckd).item(), np_kd_term([S[i]], [T1[i]], temp), temp)


def test_dkd_warmup_factor_is_mdistillers_linear_ramp():
    assert dkd_warmup_factor(1, 20) == pytest.approx(0.05)
    assert dkd_warmup_factor(10, 20) == pytest.approx(0.5)
    assert dkd_warmup_factor(20, 20) == 1.0
    assert dkd_warmup_factor(150, 20) == 1.0
    assert dkd_warmup_factor(3, 0) == 1.0
    full = dkd_loss(t32(S), t32(T1), labels(), 1.0, 8.0, 4.0, 1.0)
    ramped = dkd_loss(t32(S), t32(T1), labels(), 1.0, 8.0, 4.0, dkd_warmup_factor(5, 20))
    assert ramped.item() == pytest.approx(0.25 * full.item(), rel=1e-6)


# ----------------------------------------------------------------------------- DIST
@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("logit_std", [False, True])
def test_dist_inter_and_intra_separately(temp, logit_std):
    inter, intra = dist_terms(t32(S), t32(T3), temp, logit_std=logit_std)
    exp_inter, exp_intra = np_dist_terms(S, T3, temp, logit_std)
    assert_scaled(inter.item(), exp_inter, temp)
    assert_scaled(intra.item(), exp_intra, temp)


def test_dist_total():
    beta, gamma, temp = 2.0, 2.0, 4.0
    exp_inter, exp_intra = np_dist_terms(S, T1, temp)
    got = dist_loss(t32(S), t32(T1), beta, gamma, temp).item()
    assert got == pytest.approx(beta * exp_inter + gamma * exp_intra, **TOL)


def test_dist_is_near_zero_for_identical_inputs():
    # Not exactly zero: the 1e-8 added to the norm product matters for columns of nearly equal probabilities.
    inter, intra = dist_terms(t32(S), t32(S), 4.0)
    exp_inter, exp_intra = np_dist_terms(S, S, 4.0)
    assert 0.0 < exp_inter < 1e-3 and 0.0 < exp_intra < 1e-3
    assert_scaled(inter.item(), exp_inter, 4.0)
    assert_scaled(intra.item(), exp_intra, 4.0)


# ----------------------------------------------------------------------------- the cohort
COHORT = [T1, T2, T3]


@pytest.mark.parametrize("alpha,temp", [(0.1, 5.0), (0.3, 2.0), (0.9, 4.0), (0.0, 1.0)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cohort_with_kd_member_is_dih_loss_bit_for_bit(alpha, temp, k):
    s, cohort = t32(S), [t32(t) for t in COHORT[:k]]
    got = cohort_loss(s, cohort, labels(), kd_member(alpha, temp))
    assert torch.equal(got, dih_loss(s, cohort, labels(), alpha, temp))


def test_cohort_with_kd_member_is_bit_for_bit_on_random_batches_and_low_precision_inputs():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(64, 100, generator=gen) * 4
    cohort = [torch.randn(64, 100, generator=gen) * 6 for _ in range(4)]
    y = torch.randint(0, 100, (64,), generator=gen)
    assert torch.equal(cohort_loss(s, cohort, y, kd_member(0.1, 5.0)), dih_loss(s, cohort, y, 0.1, 5.0))
    s16, c16 = s.bfloat16(), [c.bfloat16() for c in cohort]
    assert torch.equal(cohort_loss(s16, c16, y, kd_member(0.1, 5.0)), dih_loss(s16, c16, y, 0.1, 5.0))


def test_cohort_with_standardised_kd_member_matches_formula():
    alpha, temp = 0.1, 2.0
    got = cohort_loss(t32(S), [t32(t) for t in COHORT], labels(), kd_member(alpha, temp, logit_std=True)).item()
    expected = sum(alpha * np_kd_term(S, t, temp, True) + (1 - alpha) * np_ce(S, Y) for t in COHORT)
    assert got == pytest.approx(expected, **TOL)


def np_dkd_member(t_rows, alpha, beta, temp, warm, ce_weight):
    return warm * (alpha * np_tckd(S, t_rows, Y, temp) + beta * np_nckd(S, t_rows, Y, temp)) + ce_weight * np_ce(S, Y)


def np_dist_member(t_rows, beta, gamma, temp, ce_weight):
    inter, intra = np_dist_terms(S, t_rows, temp)
    return beta * inter + gamma * intra + ce_weight * np_ce(S, Y)


@pytest.mark.parametrize("member,reference", [
    (dkd_member(), lambda t: np_dkd_member(t, 1.0, 8.0, 4.0, 1.0, 1.0)),
    (dkd_member(1.0, 2.0, 4.0, warmup_factor=0.25, ce_weight=0.5),
     lambda t: np_dkd_member(t, 1.0, 2.0, 4.0, 0.25, 0.5)),
    (dist_member(), lambda t: np_dist_member(t, 1.0, 1.0, 1.0, 1.0)),
    (dist_member(2.0, 2.0, 4.0), lambda t: np_dist_member(t, 2.0, 2.0, 4.0, 1.0)),
])
def test_cohort_with_dkd_or_dist_member_is_the_sum_of_member_losses(member, reference):
    s, cohort, y = t32(S), [t32(t) for t in COHORT], labels()
    got = cohort_loss(s, cohort, y, member)
    per_member = [member(s, t, y) for t in cohort]
    assert got.item() == pytest.approx(sum(p.item() for p in per_member), **TOL)
    assert got.item() == pytest.approx(sum(reference(t) for t in COHORT), **TOL)
    for p, t in zip(per_member, COHORT):
        assert p.item() == pytest.approx(reference(t), **TOL)


def test_dkd_member_is_dkd_loss_plus_ce():
    s, t, y = t32(S), t32(T2), labels()
    member = dkd_member(1.0, 8.0, 4.0, warmup_factor=0.4)
    expected = dkd_loss(s, t, y, 1.0, 8.0, 4.0, 0.4) + torch.nn.functional.cross_entropy(s, y)
    assert member(s, t, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cohort_accepts_a_plain_callable_and_rejects_an_empty_cohort():
    s, cohort, y = t32(S), [t32(t) for t in COHORT], labels()

    def member(st, te, lab):
        return dist_loss(st, te, 1.0, 1.0, 4.0)

    got = cohort_loss(s, cohort, y, member).item()
    assert got == pytest.approx(sum(sum(np_dist_terms(S, t, 4.0)) for t in COHORT), **TOL)
    with pytest.raises(ValueError):
        cohort_loss(s, [], y, kd_member(0.1, 5.0))
    assert isinstance(kd_member(0.1, 5.0), MemberLoss)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("logit_std", [False, True])
@pytest.mark.parametrize("student_rows", [S, [[0.5] * 5, [0.5] * 5, [0.5] * 5]], ids=["varied", "constant"])
def test_gradients_are_finite(logit_std, student_rows):
    y = labels()
    losses = {
        "kd": lambda s: kd_loss_ls(s, t32(T1), y, 0.9, 2.0, logit_std=logit_std),
        "dkd": lambda s: dkd_loss(s, t32(T1), y, 1.0, 8.0, 4.0, 0.5, logit_std=logit_std),
        "dist": lambda s: dist_loss(s, t32(T1), 2.0, 2.0, 4.0, logit_std=logit_std),
        "cohort-dkd": lambda s: cohort_loss(s, [t32(t) for t in COHORT], y, dkd_member(logit_std=logit_std)),
        "cohort-dist": lambda s: cohort_loss(s, [t32(t) for t in COHORT], y,
                                             dist_member(2.0, 2.0, 4.0, logit_std=logit_std)),
    }
    for name, fn in losses.items():
        s = t32(student_rows).requires_grad_(True)
        loss = fn(s)
        loss.backward()
        assert torch.isfinite(loss), name
        assert torch.isfinite(s.grad).all(), name
        assert s.grad.abs().sum() > 0 or name == "dist", name


def test_losses_are_float32_for_half_inputs():
    s, t, y = t32(S).half(), t32(T1).half(), labels()
    assert dkd_loss(s, t, y, 1.0, 8.0, 4.0).dtype == torch.float32
    assert dist_loss(s, t, 1.0, 1.0, 4.0).dtype == torch.float32
    assert kd_kl_term(s, t, 2.0, logit_std=True).dtype == torch.float32
