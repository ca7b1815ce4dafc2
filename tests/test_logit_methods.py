"""DKD, DIST and logit standardisation as training types, as DIH's cohort loss, and as a switch on every KD term.

The losses themselves are golden-tested in tests/test_logit_losses.py; here the Methods the console builds
are checked against them, and the new types learn on generated data from a teacher trained with CE.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from bench.parts import BenchParts
from console import TINY, data_loaded_once, make_ctx, run_inprocess
from dih_utils import build_heads
from KD_Loss import cohort_loss, dih_loss, dist_loss, dkd_loss, kd_loss_ls, kd_member
from models_repo import build_model
from dihkit.foundations.registry import REGISTRY
from TOFD.tofd import classifier_outputs

CPU = torch.device("cpu")
LS_TYPES = ("kd", "dih", "takd", "dkd", "dist", "tofd", "mhkd")
# A small learnable task: generated data, a res8 teacher trained with CE, then a few epochs per method.
WIRING = [*TINY, "--train_subset", "200"]


@pytest.fixture(scope="module", autouse=True)
def small_test_split():
    """The data are generated once per module and evaluated on 200 of the 1000 test images (faster epochs)."""
    with data_loaded_once(200):
        yield


@pytest.fixture(scope="module")
def frozen():
    """A teacher with DIH heads (untrained: the losses only need distinct outputs) and one batch."""
    torch.manual_seed(0)
    teacher = build_model("res8", 10)
    heads = build_heads(teacher, 10, 32)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    return teacher, heads, x, y


def method_for(argv, frozen):
    """The Method the type's ``bench`` builds from the console's settings for ``argv`` (same student each time)."""
    teacher, heads = frozen[:2]
    cfg = make_ctx(argv).cfg
    torch.manual_seed(1)
    return REGISTRY[cfg.training_type].bench(BenchParts(cfg, CPU, teacher, heads, 10, 32, 1000)), cfg


def loss_of(method, frozen):
    """(loss, student logits, cohort logits) of one forward in eval mode (no epoch counted)."""
    x, y = frozen[2:]
    method.eval()
    with torch.no_grad():
        loss, logits = method(x, y, torch.arange(len(y)))
        return loss, logits, method.cohort(x)


def test_cohort_loss_kd_is_todays_dih_loss_bit_for_bit(frozen):
    for argv in (["--training_type", "dih"], ["--training_type", "dih", "--cohort_loss", "kd", "--alpha", "0.3"]):
        method, cfg = method_for(argv, frozen)
        loss, logits, cohort = loss_of(method, frozen)
        assert len(cohort) == 4
        assert torch.equal(loss, dih_loss(logits, cohort, frozen[3], cfg.models.kd_alpha, cfg.models.kd_temperature))


def test_cohort_loss_dkd_and_dist_are_the_sums_of_the_member_losses(frozen):
    y = frozen[3]
    dkd, _ = method_for(["--training_type", "dih", "--cohort_loss", "dkd", "--dkd_beta", "2"], frozen)
    loss, s, cohort = loss_of(dkd, frozen)
    # DIH keeps its T 5; the first epoch's warm-up factor is 1/20.
    expected = sum(F.cross_entropy(s, y) + dkd_loss(s, t, y, 1.0, 2.0, 5.0, 1 / 20) for t in cohort)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    dist, _ = method_for(["--training_type", "dih", "--cohort_loss", "dist", "--dist_gamma", "3"], frozen)
    loss, s, cohort = loss_of(dist, frozen)
    expected = sum(F.cross_entropy(s, y) + dist_loss(s, t, 1.0, 3.0, 5.0) for t in cohort)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_std_changes_every_logit_type_to_its_standardised_loss(frozen):
    y = frozen[3]
    expected = {
        "kd": lambda s, c: kd_loss_ls(s, c[0], y, 0.1, 3.0, logit_std=True),
        "takd": lambda s, c: kd_loss_ls(s, c[0], y, 0.1, 3.0, logit_std=True),
        "dih": lambda s, c: cohort_loss(s, c, y, kd_member(0.1, 3.0, logit_std=True)),
        "dkd": lambda s, c: F.cross_entropy(s, y) + dkd_loss(s, c[0], y, 1.0, 8.0, 3.0, 1 / 20, logit_std=True),
        "dist": lambda s, c: F.cross_entropy(s, y) + dist_loss(s, c[0], 1.0, 1.0, 3.0, logit_std=True),
    }
    for kind, formula in expected.items():
        argv = ["--training_type", kind, "--kd_temperature", "3"]
        plain = loss_of(method_for(argv, frozen)[0], frozen)[0]
        loss, s, cohort = loss_of(method_for([*argv, "--logit_std"], frozen)[0], frozen)
        assert not torch.allclose(loss, plain), kind
        assert loss.item() == pytest.approx(formula(s, cohort).item(), rel=1e-6), kind


def test_logit_std_reaches_the_kd_terms_of_tofd_and_mhkd_only(frozen):
    x, y = frozen[2:]
    terms = []
    for ls in ([], ["--logit_std"]):
        method = method_for(["--training_type", "tofd", "--teacher", "res8", "--temperature", "3", *ls], frozen)[0]
        with torch.no_grad():
            student = classifier_outputs(method.student, method.aux, x)
            teacher = classifier_outputs(method.cohort.teacher, method.cohort.heads, x)
            terms.append(method.loss_terms(student, teacher, y, method.current_temperature()))
    plain, standardised = terms
    assert standardised["kd"].item() != pytest.approx(plain["kd"].item(), rel=1e-3)
    assert all(torch.equal(plain[k], standardised[k]) for k in ("ce", "feature", "orth"))
    for weights, differs in ((["--alpha", "0.5"], True), (["--alpha", "0", "--beta", "0"], False)):
        argv = ["--training_type", "mhkd", "--teacher", "res8", "--temperature", "3", *weights]
        losses = [loss_of(method_for([*argv, *ls], frozen)[0], frozen)[0] for ls in ([], ["--logit_std"])]
        # With both KD weights at 0 only CE is left, which standardisation never touches.
        assert (not torch.equal(*losses)) == differs, weights


def test_logit_std_sets_its_own_default_temperature_for_the_types_it_changes():
    for kind in LS_TYPES:
        assert "logit_std" in REGISTRY[kind].result_keys, kind
        assert make_ctx(["--training_type", kind, "--logit_std"]).cfg.models.kd_temperature == 2.0, kind
        assert make_ctx(["--training_type", kind, "--logit_std", "--temperature", "3"]).cfg.models.kd_temperature == 3
    assert make_ctx(["--training_type", "dkd"]).cfg.models.kd_temperature == 4.0
    assert make_ctx(["--training_type", "dist"]).cfg.models.kd_temperature == 1.0
    # A type whose terms are not standardised keeps its temperature.
    assert make_ctx(["--training_type", "at", "--logit_std"]).cfg.models.kd_temperature == 5.0


def test_dkd_warmup_follows_the_epoch_counted_on_the_device(frozen):
    method = method_for(["--training_type", "dkd", "--dkd_warmup", "10"], frozen)[0]
    per_epoch = method.steps_per_epoch
    distill = {}
    for epoch in (1, 5, 10, 30):
        method.steps_done.fill_((epoch - 1) * per_epoch)
        loss, s, cohort = loss_of(method, frozen)
        distill[epoch] = (loss - F.cross_entropy(s, frozen[3])).item()
    full = dkd_loss(s, cohort[0], frozen[3], 1.0, 8.0, 4.0).item()
    assert [distill[e] / full for e in (1, 5, 10, 30)] == pytest.approx([0.1, 0.5, 1.0, 1.0], rel=1e-5)
    # Evaluation batches leave the count alone; training batches advance it (a resumed run restores it with
    # the method's state). A method without a warm-up has no count.
    assert method.steps_done.item() == 29 * per_epoch
    method.steps_done.zero_()
    method.train()
    method(*frozen[2:], torch.arange(16))
    assert method.steps_done.item() == 1 and "steps_done" in method.state_dict()
    assert "steps_done" not in method_for(["--training_type", "kd"], frozen)[0].state_dict()


@pytest.mark.parametrize("argv, message", [
    (["--dkd_beta", "-1"], "--dkd_beta must be a finite number >= 0, got -1"),
    (["--dkd_alpha", "inf"], "--dkd_alpha must be a finite number >= 0, got inf"),
    (["--dkd_warmup", "-2"], "--dkd_warmup must be an integer >= 0, got -2"),
    (["--dist_gamma", "nan"], "--dist_gamma must be a finite number >= 0, got nan"),
    (["--training_type", "dih", "--cohort_loss", "crd"], "invalid choice: 'crd'"),
])
def test_bad_values_end_in_one_sentence(argv, message, capsys):
    assert run_inprocess([*TINY, "--training_type", "dkd", *argv]) == 2
    assert message in capsys.readouterr().err


def test_labels_name_the_objective():
    dkd = {"dkd_alpha": 1.0, "dkd_beta": 8.0, "kd_temperature": 4.0}
    assert REGISTRY["dkd"].report_label(dkd) == "DKD (alpha 1, beta 8, T 4)"
    assert REGISTRY["dkd"].report_label({**dkd, "logit_std": True}) == "DKD (alpha 1, beta 8, T 4) +LS"
    assert REGISTRY["dist"].report_label({"dist_beta": 2.0, "dist_gamma": 2.0, "kd_temperature": 4.0}) \
        == "DIST (beta 2, gamma 2, tau 4)"
    assert [REGISTRY["dih"].report_label({"cohort_loss": c}) for c in ("kd", "dkd", "dist")] \
        == ["dih", "DIH[DKD]", "DIH[DIST]"]
    assert REGISTRY["dih"].report_label({"cohort_loss": "dkd", "logit_std": True}) == "DIH[DKD] +LS"
    # Records written before --cohort_loss and --logit_std existed keep their label.
    assert REGISTRY["dih"].report_label({}) == "dih" and REGISTRY["kd"].report_label({}) == "kd"


# ----------------------------------------------------------------------------- console runs (learning: test_learning.py)

@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    """The session's res14 teacher (conftest): these runs check wiring, not learning."""
    return tiny_teacher / "teacher.pth"


@pytest.mark.parametrize("kind", ["dkd", "dist"])
def test_resume_refuses_a_changed_own_flag_or_logit_std(kind, teacher, tmp_path, capsys):
    out = tmp_path / f"{kind}.pth"
    argv = [*WIRING, "--training_type", kind, "--saved_path", teacher, "--path_to_save", out]
    assert run_inprocess(argv) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["complete"] and record["phase"] == kind
    # DKD's default 20-epoch warm-up outlasts the short run, and the console says so.
    epochs = record["args"]["epochs"]
    note = f"the 20-epoch warm-up is longer than the {epochs}-epoch run; the distillation terms reach {epochs / 20:.0%}"
    assert (note in capsys.readouterr().out) == (kind == "dkd")
    # The temperature is given, so that only the flag under test changes.
    flag = {"dkd": ["--dkd_beta", "2"], "dist": ["--dist_beta", "2"]}[kind]
    temperature = ["--kd_temperature", str(record["args"]["kd_temperature"])]
    for changed, name in ((flag, flag[0]), ([*temperature, "--logit_std"], "--logit_std")):
        assert run_inprocess([*argv, *changed, "--resume"]) == 2
        assert f"--resume refused: {name} was" in capsys.readouterr().err


def test_pipeline_runs_dkd_and_dist_and_reports_them_by_objective(teacher, tmp_path):
    root = tmp_path / "pipe"
    assert run_inprocess([*WIRING, "--training_type", "pipeline",
                          "--methods", "dkd", "dist", "--saved_path", teacher, "--path_to_save", root]) == 0
    for kind in ("dkd", "dist"):
        assert json.loads((root / f"{kind}_s3.json").read_text())["complete"]
    report = (root / "report.md").read_text()
    assert "DKD (alpha 1, beta 8, T 4)" in report and "DIST (beta 1, gamma 1, tau 1)" in report
