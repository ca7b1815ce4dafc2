"""TOFD's loss terms against hand-written float64 formulas, the links, the frozen teacher, and a short learning check.

The expected values are computed here in plain Python floats from the formulas of the authors' code
(docs/TOFD.md), never by calling the functions under test.
"""
import copy
import math

import pytest
import torch

from dih_utils import Cohort
from models_repo import build_model
from TOFD.tofd import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_TEMPERATURE, TOFDMethod, build_aux, build_links,
                       classifier_outputs, feature_distance, kd_temperature, map_shapes, orthogonality_loss,
                       soft_cross_entropy)

# ----------------------------------------------------------------------------- hand formulas (float64)


def log_softmax_by_hand(row, temperature=1.0):
    z = [v / temperature for v in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def ce_by_hand(rows, labels):
    return sum(-log_softmax_by_hand(r)[c] for r, c in zip(rows, labels)) / len(rows)


def soft_ce_by_hand(student_rows, teacher_rows, temperature):
    """-sum_c softmax(t/T)_c log softmax(s/T)_c, averaged over rows, no T^2."""
    total = 0.0
    for s, t in zip(student_rows, teacher_rows):
        log_q = log_softmax_by_hand(s, temperature)
        p = [math.exp(v) for v in log_softmax_by_hand(t, temperature)]
        total -= sum(pc * qc for pc, qc in zip(p, log_q))
    return total / len(student_rows)


def matmul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def transpose(a):
    return [list(col) for col in zip(*a)]


def frobenius(a):
    return math.sqrt(sum(v * v for row in a for v in row))


def minus_identity(a):
    return [[v - (1.0 if i == j else 0.0) for j, v in enumerate(row)] for i, row in enumerate(a)]


def orth_by_hand(w):
    """||W W^T - I||_F + ||W^T W - I||_F (distill.py's two torch.dist terms)."""
    return frobenius(minus_identity(matmul(w, transpose(w)))) + frobenius(minus_identity(matmul(transpose(w), w)))


def feature_distance_by_hand(w, student_feats, teacher_feats):
    """|| f_s W^T - f_t ||_2 over all entries of the batch: the bias-free linear link, then torch.dist(p=2)."""
    linked = matmul(student_feats, transpose(w))
    return math.sqrt(sum((a - b) ** 2 for ra, rb in zip(linked, teacher_feats) for a, b in zip(ra, rb)))


def rows(t: torch.Tensor):
    return t.detach().double().tolist()


# ----------------------------------------------------------------------------- each term by hand

S_LOGITS = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
T_LOGITS = [[0.5, 1.5, -1.0], [2.0, 0.0, 0.4]]


@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
def test_soft_cross_entropy_by_hand(temperature):
    expected = soft_ce_by_hand(S_LOGITS, T_LOGITS, temperature)
    got = soft_cross_entropy(torch.tensor(S_LOGITS), torch.tensor(T_LOGITS), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # A 0-d tensor temperature (what the method passes) gives the same value.
    assert soft_cross_entropy(torch.tensor(S_LOGITS), torch.tensor(T_LOGITS), torch.tensor(temperature)).item() \
        == pytest.approx(expected, rel=1e-6)
    # A cross-entropy, not a KL: equal logits leave the teacher's entropy, and there is no T^2 factor.
    entropy = soft_ce_by_hand(T_LOGITS, T_LOGITS, temperature)
    assert entropy > 0
    assert soft_cross_entropy(torch.tensor(T_LOGITS), torch.tensor(T_LOGITS), temperature).item() \
        == pytest.approx(entropy, rel=1e-6)


def test_soft_cross_entropy_golden_number():
    # Row 1 at T = 1: p = softmax([0, 0]) = (1/2, 1/2), log q = log softmax([0, log 3]) = (log 1/4, log 3/4).
    got = soft_cross_entropy(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]]), 1.0)
    assert got.item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)


def test_feature_distance_by_hand():
    w = [[1.0, 0.5], [-0.3, 2.0], [0.0, 1.0]]                  # link 2 -> 3
    f_s = [[0.2, -1.0], [1.5, 0.7]]
    f_t = [[0.0, 1.0, -2.0], [1.0, 0.3, 0.2]]
    link = build_links([(2,)], [(3,)])[0]
    with torch.no_grad():
        link.weight.copy_(torch.tensor(w))
    expected = feature_distance_by_hand(w, f_s, f_t)
    got = feature_distance(link(torch.tensor(f_s)), torch.tensor(f_t))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # One norm over the whole batch, neither squared nor averaged: repeating the batch scales it by sqrt(2).
    doubled = feature_distance(link(torch.tensor(f_s + f_s)), torch.tensor(f_t + f_t))
    assert doubled.item() == pytest.approx(math.sqrt(2) * expected, rel=1e-6)


def test_feature_distance_golden_number():
    # A 3-4-5 triangle: the difference (3, 4) has norm 5; the identity link leaves f_s as it is.
    got = feature_distance(torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, -4.0]]))
    assert got.item() == pytest.approx(5.0, rel=1e-7)


@pytest.mark.parametrize("w", [[[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]],
                               [[0.3, -1.2], [0.5, 0.7]], [[0.6, 0.8], [-0.8, 0.6]]])
def test_orthogonality_loss_by_hand(w):
    weight = torch.tensor(w, requires_grad=True)
    loss = orthogonality_loss(weight)
    assert loss.item() == pytest.approx(orth_by_hand(w), abs=1e-5)
    loss.backward()
    assert torch.isfinite(weight.grad).all()  # also at an exactly orthogonal W, where the norms are 0
    if w[0] == [1.0, 2.0, 0.0]:
        # W W^T - I = [[4, 2], [2, 1]] (norm 5); W^T W - I = [[0, 2, 0], [2, 4, 1], [0, 1, 0]] (norm sqrt 26).
        assert orth_by_hand(w) == pytest.approx(5.0 + math.sqrt(26.0), rel=1e-12)
    if w[0] == [0.6, 0.8]:
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_grows_with_the_epoch_as_in_the_authors_code():
    # distill.py: T = 1 + (t / 250) * (1 + epoch) over its 250 epochs, t = 3.
    for epoch in (0, 79, 124, 249):
        assert kd_temperature(3.0, epoch, 250) == pytest.approx(1 + (3.0 / 250) * (1 + epoch), rel=1e-12)
    assert kd_temperature(3.0, 249, 250) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- the method


@torch.no_grad()
def calibrate(net, aux, size=16):
    """Batch-norm statistics from a few random batches, as a trained teacher would have: an untrained deep
    network in eval mode with unit running variances lets its activations grow without bound."""
    bns = [m for m in [*net.modules(), *aux.modules()] if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # a plain average over the batches below
    net.train(), aux.train()
    for _ in range(2):
        classifier_outputs(net, aux, torch.randn(8, 3, size, size))
    for bn in bns:
        bn.momentum = 0.1


def small_pair(student_arch="res8", teacher_arch="res14", classes=5, seed=0):
    torch.manual_seed(seed)
    teacher, teacher_aux = build_model(teacher_arch, classes), build_aux(teacher_arch, classes)
    calibrate(teacher, teacher_aux)
    student, aux = build_model(student_arch, classes), build_aux(student_arch, classes)
    return teacher, teacher_aux, student, aux


def make_method(teacher, teacher_aux, student, aux, size=16, links=None, alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA,
                t=DEFAULT_TEMPERATURE,
                epochs=2, steps_per_epoch=2):
    if links is None:
        links = build_links(map_shapes(student, aux, size), map_shapes(teacher, teacher_aux, size))
    return TOFDMethod(student, aux, links, {}, Cohort(teacher, teacher_aux), alpha, beta, t, epochs=epochs,
                      steps_per_epoch=steps_per_epoch)


def test_whole_objective_by_hand():
    """sum_i [CE + SCE_T + alpha * ||link_i(f_s) - f_t||] + beta * sum_i ORTH(W_i), from the models' raw outputs."""
    teacher, teacher_aux, student, aux = small_pair()
    alpha, beta, t, epochs = 0.07, 0.2, 3.0, 2
    method = make_method(teacher, teacher_aux, student, aux, alpha=alpha, beta=beta, t=t, epochs=epochs).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 1, 4])
    with torch.no_grad():
        loss, logits = method(x, y, torch.arange(4))
        s_out = classifier_outputs(student, aux, x)
        t_out = classifier_outputs(teacher, teacher_aux, x)
    temperature = 1 + t * 1 / epochs  # first epoch: 1 + t * (0 + 1) / epochs
    expected = 0.0
    for (s_logits, s_feat), (t_logits, t_feat), link in zip(s_out, t_out, method.links):
        w = rows(link.weight)
        expected += ce_by_hand(rows(s_logits), y.tolist())
        expected += soft_ce_by_hand(rows(s_logits), rows(t_logits), temperature)
        expected += alpha * feature_distance_by_hand(w, rows(s_feat), rows(t_feat))
        expected += beta * orth_by_hand(w)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(logits, student(x))
    assert len(s_out) == len(t_out) == 3  # two auxiliary classifiers and the final one, paired stage by stage


def test_pairs_each_student_classifier_with_the_teachers_at_the_same_stage():
    """A copy of the teacher with identity links: only CE and the teacher's own soft entropy remain, pair by pair."""
    teacher, teacher_aux, _, _ = small_pair("res8", "res8")
    student, aux = copy.deepcopy(teacher), copy.deepcopy(teacher_aux)
    method = make_method(teacher, teacher_aux, student, aux, beta=0.03, epochs=1)
    with torch.no_grad():
        for link in method.links:
            link.weight.copy_(torch.eye(link.weight.shape[0]))
    method.eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    with torch.no_grad():
        loss, _ = method(x, y, torch.arange(6))
        outs = [rows(logits) for logits, _ in classifier_outputs(teacher, teacher_aux, x)]
    temperature = 1 + DEFAULT_TEMPERATURE  # one epoch: its temperature is the last one, 1 + t
    expected = sum(ce_by_hand(o, y.tolist()) + soft_ce_by_hand(o, o, temperature) for o in outs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The classifiers differ from stage to stage, so a shifted pairing would have a larger soft cross-entropy.
    shifted = sum(soft_ce_by_hand(outs[i], outs[(i + 1) % 3], temperature) for i in range(3))
    assert shifted > sum(soft_ce_by_hand(o, o, temperature) for o in outs) + 1e-4


def test_links_are_learned_even_when_the_widths_are_equal():
    """res110 -> res8: every feature is 64 wide, and still each pair gets a trained link with an orthogonality term."""
    teacher, teacher_aux, student, aux = small_pair("res8", "res110", classes=10)
    s_shapes, t_shapes = map_shapes(student, aux, 16), map_shapes(teacher, teacher_aux, 16)
    assert s_shapes == t_shapes == [(64,)] * 3
    links = build_links(s_shapes, t_shapes)
    assert all(isinstance(l, torch.nn.Linear) and l.weight.shape == (64, 64) and l.bias is None for l in links)
    base = make_method(teacher, teacher_aux, student, aux, links=links, beta=0.0).eval()
    with_beta = make_method(teacher, teacher_aux, student, aux, links=links, beta=0.03).eval()
    trained = {id(p) for p in with_beta.parameters() if p.requires_grad}
    assert all(id(l.weight) in trained for l in links)
    orth = sum(orth_by_hand(rows(l.weight)) for l in links)
    assert orth > 1.0  # PyTorch's default initialisation is far from orthogonal
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    loss0, _ = base(x, y, torch.arange(2))
    loss1, _ = with_beta(x, y, torch.arange(2))
    assert (loss1 - loss0).item() == pytest.approx(0.03 * orth, rel=1e-4)  # --beta changes the loss
    loss1.backward()
    assert all(l.weight.grad is not None and l.weight.grad.abs().sum() > 0 for l in links)


def test_epoch_count_sets_the_temperature_and_survives_a_resume():
    teacher, teacher_aux, student, aux = small_pair("res8", "res8")
    method = make_method(teacher, teacher_aux, student, aux, t=3.0, epochs=3, steps_per_epoch=2)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    seen = []
    with torch.no_grad():
        for _ in range(7):
            seen.append(method.current_temperature().item())
            method.train()(x, y, torch.arange(2))
    assert seen == pytest.approx([2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 4.0])  # 1 + 3 (e + 1) / 3, held at the last epoch
    with torch.no_grad():
        method.eval()(x, y, torch.arange(2))  # evaluation does not advance the count
    assert method.steps_done.item() == 7
    state = copy.deepcopy(method.state_dict())
    fresh = make_method(teacher, teacher_aux, *small_pair("res8", "res8")[2:], t=3.0, epochs=3, steps_per_epoch=2,
                        size=8)
    fresh.load_state_dict(state)
    assert fresh.current_temperature().item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="must be positive"):
        make_method(teacher, teacher_aux, student, aux, epochs=0)


def test_teacher_and_its_classifiers_stay_frozen_while_the_loss_falls():
    teacher, teacher_aux, student, aux = small_pair("res8", "res14", classes=4)
    method = make_method(teacher, teacher_aux, student, aux, epochs=1, steps_per_epoch=100)  # one temperature
    frozen = [teacher, teacher_aux]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    params = [p for p in method.parameters() if p.requires_grad]
    assert params and not any(id(p) in frozen_ids for p in params)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    losses = []
    for _ in range(8):
        method.train()
        loss, _ = method(x, y, torch.arange(8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for m, saved in zip(frozen, before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in saved.items())  # BN statistics included
        assert not any(sub.training for sub in m.modules())
        assert not any(p.requires_grad or p.grad is not None for p in m.parameters())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses  # it learns the fixed batch


def test_teacher_classifiers_give_logits_for_head_tuning():
    teacher, teacher_aux, _, _ = small_pair("res8", "res8")
    feats = teacher(torch.randn(2, 3, 16, 16), features=True)[1]
    logits = teacher_aux[0](feats[0])
    assert logits.shape == (2, 5)


def test_weights_default_to_the_authors_values():
    # distill.py's argparse: --alpha 0.05 (feature distance), --beta 0.03 (orthogonality), --t 3.0.
    assert (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_TEMPERATURE) == (0.05, 0.03, 3.0)


def test_mixed_precision_keeps_the_orthogonality_term_in_float32():
    teacher, teacher_aux, student, aux = small_pair("res8", "res8")
    method = make_method(teacher, teacher_aux, student, aux).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    exact = sum(orth_by_hand(rows(l.weight)) for l in method.links)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method(x, y, torch.arange(2))
        orth = sum(orthogonality_loss(l.weight) for l in method.links)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert orth.dtype == torch.float32 and orth.item() == pytest.approx(exact, rel=1e-5)
