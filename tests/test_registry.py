"""Adding a training type is one module plus one registry entry: a toy type, registered here, reaches the
console's flags and help, --resume's checks, the pipeline and the report with no other edit (the bench:
tests/test_bench.py)."""
import json
from dataclasses import dataclass

import pytest
import torch.nn.functional as F

import report
from console import TINY, run_inprocess
from dihkit.console.console_flags import build_parser
from dihkit.foundations.flags import Range, flag
from dihkit.runs.method_contract import StudentMethod
from dihkit.runs.model_loading import model_meta, new_model
from dihkit.foundations.registry import RECIPE_KEYS, REGISTRY, TrainingType
from dihkit.runs.run_outputs import RunPaths, claim_outputs
from train_funcs import run_phase


class ToyMethod(StudentMethod):
    """Cross-entropy scaled by a weight: enough to be a distinct objective."""

    def __init__(self, student, meta, weight):
        super().__init__(student, meta)
        self.weight = weight

    def forward(self, x, y, idx):
        """Weighted CE and logits."""
        logits = self.student(x)
        return self.weight * F.cross_entropy(logits.float(), y), logits


@dataclass(frozen=True)
class ToySettings:
    toy_weight: float


def run_toy(ctx):
    """The toy's one phase."""
    paths = RunPaths.for_output(ctx.out)
    done, = claim_outputs(ctx, [paths])
    arch = ctx.cfg.models.student
    method = ToyMethod(new_model(ctx, arch), model_meta(ctx, arch), ctx.cfg.method.toy_weight)
    return run_phase(method, ctx, paths, ctx.cfg.optim, "toy", method.meta, done)


TOY = TrainingType(
    name="toy", run=run_toy, summary="a toy objective registered by a test",
    flags=(flag("--toy_weight", type=float, default=1.0, range=Range(0, lo_open=True), help="the toy's weight"),),
    settings=ToySettings, depends_on=("student", "toy_weight"), report_order=5,
    label=lambda flags: f"TOY (weight {flags.get('toy_weight')})",
    bench=lambda parts: ToyMethod(parts.student(), {}, parts.cfg.method.toy_weight))


@pytest.fixture
def toy(monkeypatch):
    """The toy type, registered for one test."""
    monkeypatch.setitem(REGISTRY, "toy", TOY)
    return TOY


def test_toy_gets_its_flags_group_and_range(toy, capsys):
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == "toy")
    assert [a.dest for a in group._group_actions] == ["toy_weight"]
    assert "toy" in next(a for a in parser._actions if a.dest == "training_type").choices
    assert "toy" in next(a for a in parser._actions if a.dest == "methods").choices
    assert run_inprocess([*TINY, "--training_type", "toy", "--toy_weight", "inf"]) == 2
    assert "--toy_weight must be a finite number > 0, got inf" in capsys.readouterr().err
    assert toy.result_keys[:len(RECIPE_KEYS)] == RECIPE_KEYS and "toy_weight" in toy.result_keys


def test_toy_trains_resumes_and_refuses_a_changed_flag(toy, tmp_path, capsys):
    out = tmp_path / "toy.pth"
    base = [*TINY, "--training_type", "toy", "--path_to_save", out]
    assert run_inprocess([*base, "--toy_weight", "0.5"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["complete"] and record["args"]["toy_weight"] == 0.5
    assert run_inprocess([*base, "--toy_weight", "0.5", "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert run_inprocess([*base, "--toy_weight", "2", "--resume"]) == 2
    assert "--toy_weight was 0.5" in capsys.readouterr().err


def test_toy_runs_in_the_pipeline_and_gets_its_report_row(toy, tmp_path):
    root = tmp_path / "pipe"
    argv = [*TINY, "--training_type", "pipeline", "--methods", "toy", "--teacher", "res8", "--path_to_save", root]
    assert run_inprocess(argv) == 0
    manifest = json.loads((root / "pipeline.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["teacher res8", "toy seed 3"]
    assert (root / "toy_s3.pth").is_file()
    table = report.markdown(report.build_table([root]))
    assert "TOY (weight 1.0)" in table
