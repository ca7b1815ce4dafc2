"""The method's four commands, shrunk, end to end; what DIH must guarantee while it trains; and that the teacher's
logits reach the student's gradient in every logit method (and stop reaching it when the term's gradient stops)."""
import copy
import json
import shutil

import pytest
import torch

import dataload
import train_kd
from console import TINY, data_loaded_once, make_ctx, run_inprocess
from dih_utils import Cohort, build_heads, fingerprint, heads_meta, load_heads, mount_shapes
from distillation_lab import gradient_stopped
from KD_Loss import dih_loss
from dihkit.runs.model_loading import model_meta
from models_repo import build_model
from dihkit.runs.run_outputs import RunPaths
from train_fine_tune import HeadTuning
from train_funcs import Trainer
from dihkit.foundations.settings import ModelSettings
from train_kd import Distillation, kd_objective


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher):
    """The session's teacher and heads (conftest), then KD and DIH students trained by the console, as a user
    would, in one folder."""
    out = tmp_path_factory.mktemp("runs")
    for name in ("teacher.pth", "teacher.json"):
        shutil.copy(tiny_teacher / name, out / name)
    shutil.copytree(tiny_teacher / "heads", out / "headers")
    teacher, heads = out / "teacher.pth", out / "headers"
    commands = [
        ["--training_type", "kd", "--saved_path", teacher, "--path_to_save", out / "res8_kd.pth",
         "--kd_alpha", "0.1", "--kd_temperature", "5"],
        ["--saved_path", teacher, "--saved_intermediates_directory", heads, "--alpha", "0.1", "--temperature", "5",
         "--path_to_save", out / "dih_model.pth"],
    ]
    for command in commands:
        assert run_inprocess([*TINY, *command]) == 0
    return out


def test_every_command_writes_its_outputs(runs):
    assert (runs / "teacher.pth").is_file() and (runs / "teacher.json").is_file()
    assert sorted(p.name for p in (runs / "headers").glob("head_*.pth")) == ["head_1.pth", "head_2.pth", "head_3.pth"]
    for name in ("res8_kd", "dih_model"):
        record = json.loads((runs / f"{name}.json").read_text())
        assert record["complete"] and record["last_epoch"] == 1
        assert 0 <= record["test_top1"] <= 100 and record["test_top5"] >= record["test_top1"]
        assert record["args"]["seed"] == [3] and record["versions"]["torch"] == torch.__version__
        assert not (runs / f"{name}.state.pth").exists()
    dih = json.loads((runs / "dih_model.json").read_text())
    assert dih["training_type"] == "dih" and dih["meta"]["num_heads"] == 3
    assert set(dih["reference_test"]) == {"teacher", "head_1", "head_2", "head_3"}
    saved = torch.load(runs / "dih_model.pth", weights_only=True)
    assert saved["arch"] == "res8" and saved["num_classes"] == 10 and saved["dataset"] == "synthetic"


def test_test_type_prints_teacher_and_heads(runs, capsys):
    code = run_inprocess([*TINY, "--training_type", "test", "--saved_path", runs / "teacher.pth",
                          "--saved_intermediates_directory", runs / "headers"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line.split()]
    assert {"res14", "head_1", "head_2", "head_3"} <= set(names)


def test_existing_output_is_not_overwritten(runs, capsys):
    before = (runs / "res8_kd.pth").read_bytes()
    code = run_inprocess([*TINY, "--training_type", "kd", "--saved_path", runs / "teacher.pth",
                          "--path_to_save", runs / "res8_kd.pth"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (runs / "res8_kd.pth").read_bytes() == before


def tiny_ctx(tmp_path, extra=()):
    """A RunContext for the tiny recipe, for tests that drive the loop directly."""
    ctx = make_ctx([*TINY, *extra], seed=3, out=tmp_path / "out.pth")
    d = ctx.cfg.data
    ctx.data = dataload.load_data(d.dataset, d.data_dir, d.val_size, train_subset=d.train_subset)
    return ctx


def trained_teacher_and_heads(runs):
    teacher = build_model("res14", 10)
    teacher.load_state_dict(torch.load(runs / "teacher.pth", weights_only=True)["state_dict"])
    meta = heads_meta("res14", 10, 32, "synthetic", mount_shapes(teacher, 32), fingerprint(teacher))
    return teacher, load_heads(runs / "headers", teacher, meta), meta


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def student_grad(method, x, y) -> torch.Tensor:
    """The student's gradient of one training step of ``method`` on ``(x, y)``, flattened."""
    method.train()
    method.zero_grad()
    loss, _ = method(x, y, torch.arange(len(y)))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in method.student.parameters()])


def head_zeroed(heads, i: int):
    """A copy of ``heads`` whose head ``i`` predicts the uniform distribution: a different teacher signal."""
    altered = copy.deepcopy(heads)
    with torch.no_grad():
        altered[i].fc.weight.zero_()
        altered[i].fc.bias.zero_()
    return altered


def test_dih_student_gets_gradient_from_every_head(runs):
    teacher, heads, _ = trained_teacher_and_heads(runs)
    torch.manual_seed(0)
    student = build_model("res8", 10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    method = Distillation(student, {}, Cohort(teacher, heads), kd_objective(ModelSettings("res14", "res8")))
    assert len(method.cohort.heads) == 3

    def reaches(i: int) -> bool:
        other = Distillation(student, {}, Cohort(teacher, head_zeroed(heads, i)), method.objective)
        return not torch.allclose(student_grad(other, x, y), student_grad(method, x, y))

    for i in range(3):
        assert reaches(i), f"head {i + 1} does not reach the student"
    with pytest.MonkeyPatch.context() as mp:
        gradient_stopped(mp)  # the KL terms' student logits without their gradient: no head reaches it
        assert not any(reaches(i) for i in range(3))
    # And the loss is exactly the DIH loss of all four cohort members.
    with torch.no_grad():
        loss, logits = method(x, y, None)
        cohort = [teacher(x)] + [h(f) for h, f in zip(heads, teacher(x, features=True)[1])]
        assert loss.item() == pytest.approx(dih_loss(logits, cohort, y, 0.1, 5.0).item(), rel=1e-6)


def test_teacher_and_heads_do_not_change_while_training(runs, tmp_path):
    ctx = tiny_ctx(tmp_path)
    teacher, heads, meta = trained_teacher_and_heads(runs)
    teacher_before, heads_before = snapshot(teacher), snapshot(heads)
    cfg = ctx.cfg.optim
    tuning = HeadTuning(teacher, build_heads(teacher, 10, 32), meta)
    Trainer(tuning, ctx, RunPaths.for_output(tmp_path / "h", is_dir=True), cfg, "fine_tune", {**meta, "seed": 3}).run()
    assert_same(teacher_before, teacher)
    assert not teacher.training
    method = Distillation(build_model("res8", 10), model_meta(ctx, "res8"), Cohort(teacher, heads),
                          kd_objective(ModelSettings("res14", "res8")))
    Trainer(method, ctx, RunPaths.for_output(tmp_path / "s.pth"), cfg, "dih", method.meta).run()
    assert_same(teacher_before, teacher)
    assert_same(heads_before, heads)
    assert not teacher.training and not any(h.training for h in heads)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_several_seeds_get_suffixes_and_a_summary(tmp_path, capsys):
    # Later flags override TINY's (argparse keeps the last occurrence).
    assert run_inprocess([*TINY, "--seed", "1", "2", "--training_type", "ce", "--teacher", "res8",
                          "--train_subset", "200", "--path_to_save", tmp_path / "m.pth"]) == 0
    assert (tmp_path / "m_s1.pth").is_file() and (tmp_path / "m_s2.pth").is_file()
    assert "over 2 seeds" in capsys.readouterr().out


def test_summary_prints_the_model(capsys):
    assert run_inprocess(["--summary", "--dataset", "synthetic", "--student", "res8", "--gpu_id", "cpu"]) == 0
    assert "Total params" in capsys.readouterr().out


class Built(Exception):
    """Raised in place of training, once a training type has built the Method of its phase."""

    def __init__(self, method):
        super().__init__("built")
        self.method = method


@pytest.fixture(scope="module")
def data_once():
    """The generated data made once for the tests that only build a method (making it is most of their time)."""
    with data_loaded_once():
        yield


def built_method(argv) -> Distillation:
    """The Method the console builds for the first phase of ``argv`` (KD, DKD, DIST, TAKD's hops), untrained."""
    def build_only(method, *args, **kwargs):
        raise Built(method)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Built) as built:
        mp.setattr(train_kd, "run_phase", build_only)
        run_inprocess([*TINY, *argv])
    return built.value.method


class ShiftedTeacher:
    """A frozen cohort whose teacher's logits are moved by a fixed random tensor (heads as they were)."""

    def __init__(self, cohort: Cohort):
        self.cohort, self.heads = cohort, cohort.heads

    def __call__(self, x):
        logits = self.cohort(x)
        shift = torch.randn(logits[0].shape, generator=torch.Generator().manual_seed(1))
        return [logits[0] + shift, *logits[1:]]


def teacher_reaches_the_student(method, x, y) -> bool:
    """Whether moving the teacher's logits changes the student's gradient."""
    reference = student_grad(method, x, y)
    cohort, method.cohort = method.cohort, ShiftedTeacher(method.cohort)
    try:
        return not torch.allclose(student_grad(method, x, y), reference)
    finally:
        method.cohort = cohort


@pytest.mark.parametrize("argv", [
    ("--training_type", "kd"),
    ("--training_type", "takd", "--ta", "res8"),                                   # teacher -> assistant
    ("--training_type", "takd", "--ta", "res14", "--saved_ta_path", "teacher.pth"),  # assistant -> student
    ("--training_type", "dkd"),
    ("--training_type", "dist"),
], ids=["kd", "takd_assistant", "takd_student", "dkd", "dist"])
def test_the_teachers_logits_reach_the_students_gradient(runs, data_once, tmp_path, argv):
    """As the console builds each logit method: moving the teacher's logits changes the student's gradient, and
    with the distillation term's gradient stopped (the student's logits detached inside it) it no longer does."""
    argv = [runs / a if a == "teacher.pth" else a for a in argv]
    method = built_method([*argv, "--saved_path", runs / "teacher.pth", "--path_to_save", tmp_path / "s.pth"])
    assert isinstance(method, Distillation) and not method.cohort.heads
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert teacher_reaches_the_student(method, x, y)
    with pytest.MonkeyPatch.context() as mp:
        gradient_stopped(mp)
        assert not teacher_reaches_the_student(method, x, y)


def first_weights(argv) -> dict:
    """The trained model's weights as the console's first phase of ``argv`` starts training them."""
    def build_only(trainer):
        raise Built(trainer.method)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Built) as built:
        mp.setattr(Trainer, "run", build_only)
        run_inprocess([*TINY, *argv])
    return built.value.method.student.state_dict()


def test_a_students_first_weights_do_not_depend_on_what_the_method_loads(runs, data_once, tmp_path):
    """At one seed the student alone (ce), KD's and DIH's students start from the same weights: the teacher and
    heads read from files are built without drawing from the run's RNG, so seed-paired comparisons compare
    methods, not initialisations (drawing them made DIH's student start elsewhere than KD's)."""
    teacher, heads = ("--saved_path", runs / "teacher.pth"), ("--saved_intermediates_directory", runs / "headers")
    alone = first_weights(["--training_type", "ce", "--teacher", "res8", "--path_to_save", tmp_path / "ce.pth"])
    kd = first_weights(["--training_type", "kd", *teacher, "--path_to_save", tmp_path / "kd.pth"])
    dih = first_weights(["--training_type", "dih", *teacher, *heads, "--path_to_save", tmp_path / "dih.pth"])
    assert alone.keys() == kd.keys() == dih.keys()
    assert all(torch.equal(alone[k], kd[k]) and torch.equal(kd[k], dih[k]) for k in alone)
