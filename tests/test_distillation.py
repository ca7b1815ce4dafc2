"""Every distilling type distils: its student ends closer to its teacher than a twin trained without the
distillation terms, on images neither has seen; and where heads are part of the method (DIH, TOFD, MHKD) its
student learns what the heads, not only the teacher, teach.

A student trained on labels alone also comes closer to its teacher, so closeness alone proves nothing. Each case
(``distillation_lab.CASES``) therefore trains the student three times, in process, from the same weights, seed and
batches: as the method; as its twin, which keeps every weight of the method, the CE weight included, and sets the
distillation terms' weights to 0; and as its negative control, the method itself with the student's tensors
entering every distillation term without their gradient (values kept). The method's distance must be at most
``1 - margin`` times its twin's; the control trains exactly as the twin does and must fail that check, so a twin
that differed in anything but distillation, or a check that compared the wrong runs, fails here.

The distance is the KL divergence of the student's softened outputs from the teacher's (for DIH from each of the
teacher and its heads, averaged) on the held-out test images, at ``CLOSENESS_T``; with ``--logit_std`` both sides
are standardised first; for AT, the distance of the attention maps. The references (teacher and heads) are
computed from the files, never through ``Cohort`` or ``load_heads``. Seed 7 runs by default, seeds 8 and 9 with
``--runslow``; ``python3 tests/measure_distillation.py`` prints every figure the margins rest on.
"""
import pytest
import torch

from console import data_loaded_once
from dih_utils import Cohort, build_heads, fingerprint, heads_meta, load_heads, mount_shapes
from dihkit.foundations.registry import REGISTRY
from distillation_lab import (CASES, CLASSES, HEADS_CHECKS, SEEDS, TEACHER_HEADS, Lab, World, distils, head_states,
                              load_teacher_file, make_noisy_world)
from MHKD.mhkd import build_multi_heads
from TOFD.tofd import build_aux, classifier_outputs

# Seed 7 in the default run; the others under --runslow (CI's full suite).
SEED_PARAMS = [SEEDS[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SEEDS[1:])]


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    """One lab per seed over one world; every run's data loaded once, its per-epoch evaluation on a few test
    images only (the distances use all of them)."""
    world = World(make_noisy_world(tmp_path_factory.mktemp("noisy_labels")))
    folder = tmp_path_factory.mktemp("distillation")
    with data_loaded_once(20):
        yield {seed: Lab(world, folder / f"seed_{seed}", seed) for seed in SEEDS}


def test_every_case_names_a_registered_type():
    stale = sorted({c.type for c in CASES.values()} - set(REGISTRY))
    assert not stale, f"CASES names unregistered training types: {stale}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_distilling_type_has_a_case(name):
    if REGISTRY[name].trains == "student":
        assert any(c.type == name for c in CASES.values()), (
            f"training type {name!r} distils but has no distillation test: add its case, with its twin's flags, to "
            f"CASES in tests/distillation_lab.py, and its distillation terms to STOPPED")


def same_start(a, b) -> bool:
    """Whether two runs' first students started from the same weights."""
    return a.start.keys() == b.start.keys() and all(torch.equal(a.start[k], b.start[k]) for k in a.start)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", SEED_PARAMS)
def test_the_student_is_closer_to_its_teacher_than_its_twin_without_distillation(labs, seed, name):
    lab = labs[seed]
    method, twin = lab.distance(name), lab.distance(name, "twin")
    ratio, limit = method / twin, 1 - CASES[name].margin
    print(f"\n{name}, seed {seed}: distance from the teacher {method:.4f}, twin without distillation {twin:.4f} "
          f"(ratio {ratio:.3f}, at most {limit:.3f} required)")
    assert same_start(lab.outcome(name), lab.outcome(name, "twin")), "the twins start alike"
    assert distils(method, twin, CASES[name].margin), (
        f"{name}: the student is not closer to its teacher than its twin without distillation: "
        f"{method:.4f} against {twin:.4f}, ratio {ratio:.3f} > {limit:.3f}")


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", SEED_PARAMS)
def test_the_negative_control_trains_as_the_twin_and_fails_the_check(labs, seed, name):
    """The method's own run with its distillation gradient stopped (``STOPPED``): a real run of its own. It ends
    where the twin ends, which shows that the twin differs from the method in the distillation terms alone; and
    the check refuses it."""
    lab = labs[seed]
    control, twin = lab.distance(name, "control"), lab.distance(name, "twin")
    print(f"\n{name}, seed {seed}: negative control {control:.4f}, twin {twin:.4f}")
    assert same_start(lab.outcome(name, "control"), lab.outcome(name, "twin"))
    assert control == pytest.approx(twin, rel=1e-5), (
        f"{name}: with every distillation gradient stopped the student ends at {control:.4f}, its twin at "
        f"{twin:.4f}: the twin differs from the method in more than distillation, or a distillation term of this "
        f"type is missing from STOPPED")
    assert not distils(control, twin, CASES[name].margin)


@pytest.mark.parametrize("name", sorted(HEADS_CHECKS))
@pytest.mark.parametrize("seed", SEED_PARAMS)
def test_the_heads_teach_the_student(labs, seed, name):
    """DIH's student ends closer to heads 1..k than KD's at the same seed and weights; TOFD's and MHKD's student
    heads end closer to the teacher's heads than their twin's. With the teacher's final classifier answering in
    the heads' place (a real run of its own) the same check fails."""
    lab, check = labs[seed], HEADS_CHECKS[name]
    method, other = lab.heads_distance(name), lab.heads_distance(name, check.comparator)
    control = lab.heads_distance(name, check.control)
    print(f"\n{name}, seed {seed}: distance from the teacher's heads {method:.4f}, {check.comparator} {other:.4f} "
          f"(ratio {method / other:.3f}, at most {1 - check.margin:.3f} required); teacher in the heads' place "
          f"{control:.4f} (ratio {control / other:.3f})")
    assert same_start(lab.outcome(name), lab.outcome(name, check.comparator)), "both students start alike"
    assert distils(method, other, check.margin), f"{name}: the heads do not teach the student ({method / other:.3f})"
    assert not distils(control, other, check.margin), f"{name}: the check passes with the teacher as every head"


def toolkit_heads(kind: str, folder, teacher, x) -> list:
    """The logits of the toolkit's own heads of ``kind`` in ``folder`` on ``x``: loaded by ``load_heads``, run by
    ``Cohort`` (TOFD's auxiliary classifiers by its ``classifier_outputs``)."""
    heads = {"dih": lambda: build_heads(teacher, CLASSES, 8), "tofd": lambda: build_aux("res8", CLASSES),
             "mhkd": lambda: build_multi_heads(teacher, CLASSES, 8)}[kind]()
    meta = heads_meta("res8", CLASSES, 8, "imagefolder", mount_shapes(teacher, 8)[:len(heads)], fingerprint(teacher))
    heads = load_heads(folder, teacher, meta, heads)
    if kind == "tofd":
        with torch.no_grad():
            return [logits for logits, _ in classifier_outputs(teacher, heads.eval(), x)[:-1]]
    return Cohort(teacher, heads)(x)[1:]


@pytest.mark.parametrize("kind", sorted(TEACHER_HEADS))
def test_the_tests_references_are_the_toolkits_heads_on_the_clean_tree(labs, kind):
    """The tests' own forward of the head files (plain torch operations; TOFD's heads its own blocks) gives what
    the toolkit's heads give: a wrong reference would make the heads checks moot."""
    lab = labs[SEEDS[0]]
    name = next(n for n in HEADS_CHECKS if CASES[n].type == kind)
    lab.outcome(name)  # TOFD's and MHKD's method runs fine-tune their teacher's heads
    folder, teacher = lab.heads_folder(name), load_teacher_file(lab.world.folder / "teacher.pth")
    ours = TEACHER_HEADS[kind](head_states(folder), lab.world.teacher_feats)
    theirs = toolkit_heads(kind, folder, teacher, lab.world.held_out)
    assert len(ours) == len(theirs) == (2 if kind == "tofd" else 3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_check_needs_a_positive_distance_below_the_margin():
    assert distils(0.5, 1.0, 0.4) and not distils(0.7, 1.0, 0.4) and not distils(0.0, 1.0, 0.4)
    assert not distils(float("nan"), 1.0, 0.4)
