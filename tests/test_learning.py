"""Every registered training type learns: a short CPU run on generated data ends clearly above chance, and
the method's own term moves the way it should.

One res8 teacher and its heads are trained once for the module (they are the ``ce`` and ``fine_tune``
runs); every other type then trains a res8 student from them with the console, in process (the pair that
learns most in a few CPU seconds; the stage-by-stage methods need equal stage counts anyway). Each term is
measured with the method's own loss functions on one fixed batch of training images, in eval mode and
without gradients, on the very modules the run builds: ``Trainer.run`` is wrapped so that the term is
taken just before the phase's first step and again after its last (under a forked RNG, so measuring
never changes what the run draws).

A registered type without an entry in ``CHECKS`` fails ``test_every_type_learns`` under its own name:
adding a type means adding its check here. A falling term shows that the student learns, not that it learns
from its teacher (a student trained on labels alone also brings its KL to the teacher down):
``tests/test_distillation.py`` shows that.
"""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import dataload
import train_funcs
import training_types  # noqa: F401  (fills the registry)
from console import data_loaded_once, run_inprocess
from KD_Loss import at_loss, kd_kl_term, soft_kl
from dihkit.foundations.registry import REGISTRY
from TOFD.tofd import classifier_outputs, kd_temperature, soft_cross_entropy

# Generated data: 10 classes, so chance is 10%; a run must end at twice that or more.
CHANCE, MIN_TOP1 = 10.0, 20.0
# A term has fallen when its value after training is at most this fraction of its value before.
FALLEN = 0.8
FIXED_IMAGES = 256          # the fixed training batch every term is measured on
TEST_IMAGES = 300           # evaluation every epoch weighs on short runs: part of the test split suffices
# Short runs learn most with a constant lr and one decay before the last epoch.
BASE = ["--dataset", "synthetic", "--train_subset", "400", "--epochs", "3", "--schedule", "2", "--seed", "7",
        "--gpu_id", "cpu", "--batch_size", "32", "--teacher", "res8", "--student", "res8"]


# --- the terms, each computed with the method's own loss function on a batch (x, y) -----------------------

def own_objective(m, x, y):
    """The method's whole objective (ce: CE; fine_tune and the head phases: the heads' CE, summed;
    FitNets stage 1: the hint loss)."""
    return m(x, y, torch.arange(len(y)))[0]


def distillation_term(m, x, y):
    """A distillation run's own term (its cohort member's ``distill``) summed over its frozen cohort: the
    KL to the teacher for kd (to the assistant for TAKD's second hop), to every cohort member for dih."""
    logits = m.student(x)
    return sum(m.objective.member.distill(logits, t, y) for t in m.cohort(x))


def attention_term(m, x, y):
    """AT's term over the paired stage outputs."""
    return at_loss(m.student(x, features=True)[1], m.cohort.features(x)[1], m.beta, m.p)


def contrastive_term(m, x, y):
    """CRD's two-sided NCE on the batch against the run's own memory banks and normaliser: the objective of
    its forward less the CE and KD terms, over beta. The batch is the first training images (indices 0..B-1);
    the forward's updates of banks, normaliser and negative sampler are undone afterwards."""
    state = {k: v.clone() for k, v in m.state_dict().items()}
    loss, logits = m(x, y, torch.arange(len(y)))
    kd = soft_kl(logits, m.cohort(x)[0], m.temperature)
    m.load_state_dict(state)
    return (loss - F.cross_entropy(logits, y) - m.alpha * kd) / m.beta


def tofd_terms(m, x, y):
    """TOFD's unweighted terms (``loss_terms``) on the batch, and the last epoch's temperature and teacher outputs."""
    temperature = kd_temperature(m.temperature, m.epochs - 1, m.epochs)
    teacher = classifier_outputs(m.cohort.teacher, m.cohort.heads, x)
    return m.loss_terms(classifier_outputs(m.student, m.aux, x), teacher, y, temperature), teacher, temperature


def tofd_feature(m, x, y):
    """TOFD's feature distance through the links, summed over the classifier pairs."""
    return tofd_terms(m, x, y)[0]["feature"]


def tofd_soft_ce(m, x, y):
    """TOFD's soft cross-entropy to the teacher, summed over the pairs, above its floor (the teacher's own
    entropy, which the soft CE keeps): the part the student can remove."""
    terms, teacher, temperature = tofd_terms(m, x, y)
    return terms["kd"] - sum(soft_cross_entropy(t, t, temperature, logit_std=m.logit_std) for t, _ in teacher)


def mhkd_head_kd(m, x, y):
    """MHKD's per-stage term: the KL of each student head to the teacher's head at the same stage, summed."""
    _, feats, _ = m.student(x, features=True)
    return sum(kd_kl_term(head(f), t, m.temperature, logit_std=m.logit_std)
               for head, f, t in zip(m.heads, feats, m.cohort(x)[1:]))


def mhkd_final_kd(m, x, y):
    """MHKD's KD term on the final logits: the KL to the teacher's."""
    return kd_kl_term(m.student(x), m.cohort(x)[0], m.temperature, logit_std=m.logit_std)


@dataclass(frozen=True)
class Check:
    """What one type's learning test measures, ``{phase: {term name: fn(method, x, y)}}``; its own flags;
    and the fraction of its value before training that each term must end at or below."""
    terms: dict
    flags: tuple = ()
    fall: float = FALLEN


CHECKS = {
    "ce": Check({"ce": {"CE": own_objective}}, ("--epochs", "5", "--schedule", "4")),
    # At the recipe's lr 0.1 the flattened heads (16,384 inputs on the first stage) overshoot: their summed CE
    # goes from 7.1 to about 200 in these two epochs, with no better accuracy than at 0.001 (38% against 41%);
    # the real CIFAR-10 heads of docs/RESULTS.md show the same (582 in the first epoch and 101 after eight in
    # round 1; 464 and 88 in round 2). Here they train where SGD is stable.
    "fine_tune": Check({"fine_tune": {"heads' CE, summed": own_objective}},
                       ("--epochs", "2", "--schedule", "1", "--lr", "0.001")),
    "kd": Check({"kd": {"KL to the teacher": distillation_term}}),
    "dih": Check({"dih": {"KL to the cohort, summed": distillation_term}}),
    # NCKD weight 2 (mdistiller's for res110 -> res32): with the default 8 this run's NCKD rises (2.13 -> 3.04)
    # while TCKD falls, at lr 0.1 within the warm-up; with 2 both fall. A 2-epoch warm-up, so that the run's
    # last epoch trains the terms at their full weight.
    "dkd": Check({"dkd": {"TCKD + NCKD to the teacher": distillation_term}}, ("--dkd_beta", "2", "--dkd_warmup", "2")),
    "dist": Check({"dist": {"inter + intra to the teacher": distillation_term}}),
    "fitnets": Check({"fitnets_1": {"hint loss": own_objective}}, ("--epochs_fitnets_1", "2")),
    # Both hops train here; the assistant starts from other weights than the student (drawn before it).
    "takd": Check({"takd_ta": {"KL to the teacher": distillation_term},
                   "takd": {"KL to the assistant": distillation_term}}, ("--ta", "res8")),
    "at": Check({"at": {"attention term": attention_term}}),
    # 39 steps move the NCE term from about 15 by roughly a tenth; aligned embeddings would take it near 2. The
    # memory banks' updates move it too: with the term's weight at 0.001 (--beta) it ends at 0.967, 0.989 and
    # 0.942 of its value (seeds 7, 8, 9), at its weight 0.8 at 0.922, 0.865 and 0.899: the limit lies between.
    "crd": Check({"crd": {"contrastive term": contrastive_term}}, fall=0.93),
    # TOFD's classifiers and MHKD's heads cost several students each: two epochs keep the module's time in bounds.
    "tofd": Check({"tofd": {"feature distance": tofd_feature, "soft CE above the teacher's entropy": tofd_soft_ce}},
                  ("--epochs", "2", "--schedule", "1")),
    "mhkd": Check({"mhkd": {"final KL to the teacher": mhkd_final_kd, "heads' KL to the teacher's": mhkd_head_kd}},
                  ("--epochs", "2", "--schedule", "1")),
}


# --- the runs -----------------------------------------------------------------------------------------------

def measure(terms: dict, method, batch) -> dict:
    """Every term's value on ``batch``, in eval mode, without gradients, leaving the RNG and the mode as found."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        was_training = method.training
        method.eval()
        values = {name: float(fn(method, *batch)) for name, fn in terms.items()}
        method.train(was_training)
    return values


class Lab:
    """Runs each training type once, in process, and keeps each phase's result and measured terms."""

    def __init__(self, folder):
        self.folder = folder
        self.phases = {}            # (type, phase) -> (result record, terms before, terms after)
        self.starts = {}            # (type, phase) -> the student's weights when the phase starts
        self.batch = None           # the fixed (x, y), taken from the first run's training split

    def observe(self, trainer, run) -> dict:
        """``Trainer.run`` with the phase's terms measured just before its first step and after its last."""
        name = trainer.ctx.cfg.training_type
        terms = CHECKS[name].terms.get(trainer.phase, {}) if name in CHECKS else {}
        if self.batch is None:
            data = trainer.ctx.data
            self.batch = (dataload.normalize(data.train.images[:FIXED_IMAGES], data.info.mean, data.info.std),
                          data.train.labels[:FIXED_IMAGES])
        before = measure(terms, trainer.method, self.batch)
        if hasattr(trainer.method, "student"):
            self.starts[(name, trainer.phase)] = {k: v.clone() for k, v in trainer.method.student.state_dict().items()}
        record = run(trainer)
        self.phases[(name, trainer.phase)] = (record, before, measure(terms, trainer.method, self.batch))
        return record

    def output(self, name: str):
        """Where a type's run writes."""
        return self.folder / (name if REGISTRY[name].output_is_dir else f"{name}.pth")

    def run(self, name: str) -> None:
        """Train ``name`` once (and first the teacher and heads it needs)."""
        if any(key[0] == name for key in self.phases):
            return
        t, inputs = REGISTRY[name], []
        if "teacher" in t.needs:
            self.run("ce")
            inputs += ["--saved_path", self.output("ce")]
        if "heads" in t.needs:
            self.run("fine_tune")
            inputs += ["--saved_intermediates_directory", self.output("fine_tune")]
        argv = [*BASE, "--training_type", name, "--path_to_save", self.output(name), *inputs, *CHECKS[name].flags]
        assert run_inprocess(argv) == 0, f"{name}: the run failed"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One lab per module: the teacher and heads are trained once and shared by every type's test."""
    lab = Lab(tmp_path_factory.mktemp("learning"))
    real_run = train_funcs.Trainer.run
    with data_loaded_once(TEST_IMAGES), pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_funcs.Trainer, "run", lambda trainer: lab.observe(trainer, real_run))
        yield lab


def test_every_check_names_a_registered_type():
    stale = sorted(set(CHECKS) - set(REGISTRY))
    assert not stale, f"CHECKS has entries for unregistered training types: {stale}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_type_learns(lab, name):
    assert name in CHECKS, (f"training type {name!r} has no learning check: add its entry to CHECKS in "
                            f"tests/test_learning.py")
    lab.run(name)
    top1 = lab.phases[(name, REGISTRY[name].final_phase_name)][0]["test_top1"]
    moves = [(f"{phase}: {term}", before[term], after[term]) for phase, terms in CHECKS[name].terms.items()
             for _, before, after in [lab.phases[(name, phase)]] for term in terms]
    print(f"\n{name}: test top-1 {top1:.1f}%" + "".join(f"\n  {t}: {b:.4f} -> {a:.4f}" for t, b, a in moves))
    assert top1 >= MIN_TOP1, f"{name} ended at {top1:.1f}% test top-1 (chance: {CHANCE:.0f}%)"
    assert not unmoved(moves, CHECKS[name].fall), f"{name}: " + "; ".join(unmoved(moves, CHECKS[name].fall))


def unmoved(moves, fall: float) -> list:
    """The terms that did not fall to ``fall`` times their value before training; a term that was not
    positive and finite before, or is not finite after, counts as unmoved (a term always 0 cannot fall)."""
    return [f"{t} went from {b:.4f} to {a:.4f}" for t, b, a in moves
            if not (b > 0 and math.isfinite(b) and math.isfinite(a) and a <= fall * b)]


def test_a_term_that_is_zero_or_not_finite_has_not_fallen():
    assert unmoved([("t", 1.0, 0.5)], 0.8) == []
    assert unmoved([("t", 1.0, 0.9)], 0.8) == ["t went from 1.0000 to 0.9000"]
    for before, after in ((0.0, 0.0), (-1.0, -2.0), (math.nan, 0.1), (math.inf, 1.0), (1.0, math.nan)):
        assert len(unmoved([("t", before, after)], 0.8)) == 1, (before, after)


def test_fitnets_stage_2_starts_from_stage_1s_guided_layers(lab):
    """Stage 2 starts from stage 1's export: its guided layers (stem and stages up to the guided one) are the
    trained ones, not a fresh student's; the layers above them kept their initial weights in stage 1."""
    lab.run("fitnets")
    fresh, second = lab.starts[("fitnets", "fitnets_1")], lab.starts[("fitnets", "fitnets_2")]
    record = torch.load(lab.output("fitnets"), weights_only=True)
    exported, guided = record["state_dict"], record["guided_layer"]
    assert second.keys() == exported.keys()
    assert all(torch.equal(second[k], exported[k]) for k in second), "stage 2 starts from stage 1's export"
    below = ("stem.", *(f"stages.{i}." for i in range(guided + 1)))
    weights = [k for k in second if k.endswith(".weight") and k.startswith(below)]
    assert weights and all(not torch.equal(second[k], fresh[k]) for k in weights), "the guided layers were trained"
    above = [k for k in second if k.endswith(".weight") and not k.startswith(below)]
    assert above and all(torch.equal(second[k], fresh[k]) for k in above)
