"""Golden values for the KD and DIH losses, computed by hand with plain Python arithmetic."""
import math

import pytest
import torch

from KD_Loss import dih_loss, kd_loss, soft_kl

S = [[1.0, 2.0, 0.5], [0.1, -1.0, 2.0]]
T1 = [[2.0, 1.0, 0.0], [0.5, 0.5, -0.5]]
T2 = [[-1.0, 0.0, 3.0], [1.5, -0.5, 0.0]]
T3 = [[0.0, 0.0, 0.0], [4.0, 1.0, -2.0]]
Y = [1, 2]


def softmax(row, temp=1.0):
    exps = [math.exp(v / temp) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl_batchmean(s_rows, t_rows, temp):
    total = 0.0
    for s, t in zip(s_rows, t_rows):
        p, q = softmax(t, temp), softmax(s, temp)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(s_rows)


def cross_entropy(s_rows, labels):
    return sum(-math.log(softmax(s)[y]) for s, y in zip(s_rows, labels)) / len(s_rows)


def kd_by_hand(s_rows, t_rows, labels, alpha, temp):
    return alpha * temp * temp * kl_batchmean(s_rows, t_rows, temp) + (1 - alpha) * cross_entropy(s_rows, labels)


@pytest.mark.parametrize("alpha,temp", [(0.1, 5.0), (0.3, 2.0), (1.0, 1.0), (0.0, 4.0)])
def test_kd_loss_matches_hand_computation(alpha, temp):
    got = kd_loss(torch.tensor(S), torch.tensor(T1), torch.tensor(Y), alpha, temp).item()
    assert got == pytest.approx(kd_by_hand(S, T1, Y, alpha, temp), rel=1e-6, abs=1e-7)


def test_soft_kl_is_t_squared_batchmean_kl():
    got = soft_kl(torch.tensor(S), torch.tensor(T2), 3.0).item()
    assert got == pytest.approx(9.0 * kl_batchmean(S, T2, 3.0), rel=1e-6)


def test_dih_loss_is_the_sum_of_kd_over_the_cohort():
    alpha, temp = 0.1, 5.0
    cohort = [T1, T2, T3]
    expected = sum(kd_by_hand(S, t, Y, alpha, temp) for t in cohort)
    got = dih_loss(torch.tensor(S), [torch.tensor(t) for t in cohort], torch.tensor(Y), alpha, temp).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # The CE term is counted once per cohort member, as the method's code does.
    kl = sum(kl_batchmean(S, t, temp) for t in cohort)
    assert got == pytest.approx(alpha * temp ** 2 * kl + 3 * (1 - alpha) * cross_entropy(S, Y), rel=1e-6)


def test_dih_with_one_member_is_kd():
    s, t, y = torch.tensor(S), torch.tensor(T3), torch.tensor(Y)
    assert dih_loss(s, [t], y, 0.4, 3.0).item() == pytest.approx(kd_loss(s, t, y, 0.4, 3.0).item(), rel=1e-7)


def test_losses_are_float32_under_bfloat16_logits():
    s, t = torch.tensor(S).bfloat16(), torch.tensor(T1).bfloat16()
    got = kd_loss(s, t, torch.tensor(Y), 0.1, 5.0)
    assert got.dtype == torch.float32
    ref = kd_by_hand(s.float().tolist(), t.float().tolist(), Y, 0.1, 5.0)
    assert got.item() == pytest.approx(ref, rel=1e-5)
