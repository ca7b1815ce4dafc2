"""The method's four commands, shrunk, end to end; and what DIH must guarantee while it trains."""
import copy
import json
import shutil

import pytest
import torch

import dataload
from console import TINY, make_ctx, run_inprocess
from dih_utils import Cohort, build_heads, fingerprint, heads_meta, load_heads, mount_shapes
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


def test_dih_student_gets_gradient_from_every_head(runs):
    teacher, heads, _ = trained_teacher_and_heads(runs)
    torch.manual_seed(0)
    student = build_model("res8", 10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    method = Distillation(student, {}, Cohort(teacher, heads), kd_objective(ModelSettings("res14", "res8")))
    method.train()
    assert len(method.cohort.heads) == 3

    def student_grad(m):
        m.zero_grad()
        loss, _ = m(x, y, None)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in m.student.parameters()])

    reference = student_grad(method)
    for i in range(3):
        altered = copy.deepcopy(heads)
        with torch.no_grad():
            # A zeroed head predicts the uniform distribution: a different teacher signal.
            altered[i].fc.weight.zero_()
            altered[i].fc.bias.zero_()
        other = Distillation(student, {}, Cohort(teacher, altered), kd_objective(ModelSettings("res14", "res8")))
        assert not torch.allclose(student_grad(other), reference), f"head {i + 1} does not reach the student"
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
