"""The benchmark: it times the registry's training types, runs end to end on a tiny setting and reports every
ratio the README quotes, and its authors'-style DIH step is an independent check of the toolkit's DIH loss."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dihkit.foundations import registry
from bench import bench as bench_cli
from bench.authors_dih import authors_step, student_gradient_gap
from bench.parts import AUTHORS_DIH, BenchParts, bench_types, build_methods, shared_parts, type_settings
from bench.timing import generated_data, make_ctx
from bench.variants import variants
from console import ROOT, run_subprocess
from dihkit.runs.method_contract import StudentMethod
from dihkit.foundations.registry import REGISTRY, TrainingType
from TOFD import tofd

TINY = ["--teacher", "res8", "--student", "res8", "--dataset", "cifar10", "--batch_size", "8", "--device", "cpu"]
CPU = torch.device("cpu")


def test_bench_reports_steps_epochs_ratios_and_targets(tmp_path):
    out = tmp_path / "bench.json"
    done = run_subprocess(["--teacher", "res8", "--student", "res8", "--dataset", "cifar10", "--batch_size", "8",
                           "--warmup", "1", "--steps", "1", "--repeats", "2", "--epoch_images", "16",
                           "--loader_images", "32", "--epoch_repeats", "1", "--num_workers", "0", "--test_images",
                           "8", "--threads", "1", "--out", out], cwd=tmp_path, timeout=300, script="bench/bench.py")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    methods = {t.name for t in REGISTRY.values() if t.bench is not None}
    assert {"ce", "fine_tune", "kd", "dih", "fitnets", "at", "crd", "tofd", "mhkd"} <= methods
    assert set(result["steps"]) == methods | {AUTHORS_DIH, "teacher_inference", "cohort_inference"}
    assert all(len(s["times_s"]) == 2 and s["images_per_s"] > 0 for s in result["steps"].values())
    assert set(result["epochs"]) == {"ce/device", "fine_tune/device", "kd/device", "dih/device",
                                     "ce_data_path/device", "ce_data_path/loader",
                                     "data_only/device", "data_only/loader"}
    assert {"dih_to_floor", "fine_tune_to_teacher_inference", "dih_original_to_dih",
            "loader_to_device_epoch", "loader_to_device_data_only"} <= set(result["ratios"])
    assert set(result["targets"]) == {"dih_to_floor", "fine_tune_to_teacher_inference", "loader_to_device_epoch"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    # Two independent computations of the DIH loss (ours, and the authors' member by member) agree.
    assert result["student_grad_max_abs_diff"] < 1e-5
    assert result["skipped"] == [] and result["projected_dih_200_epochs_hours"] > 0
    assert result["load_average"]["samples_1min"] and result["machine"]["torch"]
    assert "target dih_to_floor" in done.stdout and (ROOT / "bench" / "bench.py").is_file()


def dih_pair(alpha: float, temperature: float, authors_alpha: float | None = None):
    """The toolkit's DIH step and the authors'-style step on one tiny teacher/heads/student, with a batch and
    context; ``authors_alpha`` changes alpha in the authors' step only."""
    opts = bench_cli.parse_args(TINY)
    torch.manual_seed(0)
    base = shared_parts(opts, CPU)
    cfg = type_settings(opts, "dih")
    cfg = replace(cfg, models=replace(cfg.models, kd_alpha=alpha, kd_temperature=temperature))
    parts = replace(base, cfg=cfg)
    ours = REGISTRY["dih"].bench(parts)
    if authors_alpha is not None:
        parts = replace(parts, cfg=replace(cfg, models=replace(cfg.models, kd_alpha=authors_alpha)))
    authors = authors_step(parts)
    data = generated_data(opts.dataset, 8, 8)
    x = (data.train.images.float() / 255 - 0.5) / 0.25
    batch = (x, data.train.labels, torch.arange(8))
    return ours, authors, batch, make_ctx(cfg, CPU, data, Path("unused"))


@pytest.mark.parametrize("alpha, temperature", [(0.1, 5.0), (0.9, 2.0)])
def test_authors_step_gives_the_toolkits_student_gradients(alpha, temperature):
    ours, authors, batch, ctx = dih_pair(alpha, temperature)
    assert len(ours.cohort.heads) == 3 and len(authors.graph[1]) == 3
    assert student_gradient_gap(ours, authors, batch, ctx) < 1e-5
    # The authors' step back-propagates into its own copies of the teacher and heads; ours leaves them alone.
    teacher_copy, heads_copy = authors.graph
    assert all(p.grad is not None for p in [*teacher_copy.parameters(), *heads_copy.parameters()])
    assert all(p.grad is None and not p.requires_grad for p in ours.cohort.teacher.parameters())
    assert not any(p.requires_grad for p in ours.cohort.heads.parameters())


def test_gradient_check_can_fail():
    """A different loss in the authors' step only (alpha 0.5 instead of 0.1) opens a large gap."""
    ours, authors, batch, ctx = dih_pair(0.1, 5.0, authors_alpha=0.5)
    assert student_gradient_gap(ours, authors, batch, ctx) > 1e-2


def test_parts_carry_each_types_own_defaults():
    opts = bench_cli.parse_args(TINY + ["--precision", "bf16", "--memory_format", "channels_last"])
    cfg = type_settings(opts, "tofd")
    assert (cfg.training_type, cfg.models.kd_alpha, cfg.models.kd_temperature) == \
        ("tofd", tofd.DEFAULT_ALPHA, tofd.DEFAULT_TEMPERATURE)
    assert type_settings(opts, "dih").models.kd_alpha == 0.1
    assert cfg.data.batch_size == 8 and cfg.run.amp and cfg.run.channels_last and not cfg.run.compile


def test_same_stage_types_are_skipped_when_stage_counts_differ():
    same_stages = [t for t in bench_types() if REGISTRY[t].same_stages]
    assert {"at", "tofd", "mhkd"} <= set(same_stages)
    opts = bench_cli.parse_args(["--teacher", "res18", "--student", "res8", "--dataset", "cifar10", "--device", "cpu",
                                 "--methods", "ce", *same_stages, "--epoch_methods"])
    methods, settings, _, skipped = build_methods(opts, CPU, authors_step)
    assert skipped == same_stages and set(methods) == set(settings) == {"ce"}


class ToyCE(StudentMethod):
    """The toy type's step: CE on the student."""

    def forward(self, x, y, idx):
        logits = self.student(x)
        return F.cross_entropy(logits.float(), y), logits


def test_bench_methods_are_the_registrys(monkeypatch, tmp_path):
    argv = TINY + ["--methods", "toy", "--steps", "1", "--repeats", "1", "--warmup", "0", "--epoch_methods",
                   "--test_images", "8", "--out", str(tmp_path / "toy.json")]
    with pytest.raises(SystemExit):
        bench_cli.parse_args(argv)   # not registered: not a choice
    seen = []

    def bench_toy(parts: BenchParts):
        seen.append(parts)
        return ToyCE(parts.student(), {})

    monkeypatch.setitem(registry.REGISTRY, "toy", TrainingType(name="toy", run=lambda ctx: {}, summary="toy: CE",
                                                                bench=bench_toy))
    assert "toy" in bench_types()
    assert bench_cli.main(argv) == 0
    result = json.loads((tmp_path / "toy.json").read_text())
    assert set(result["steps"]) == {"toy", "ce", "teacher_inference", "cohort_inference"}
    assert result["steps"]["toy"]["images_per_s"] > 0 and "toy_to_floor" in result["ratios"]
    assert result["epochs"] == {} and "student_grad_max_abs_diff" not in result
    parts, = seen
    assert parts.cfg.training_type == "toy" and parts.cfg.data.batch_size == 8
    assert parts.classes == 10 and parts.size == 32 and parts.device == CPU


def test_variants_take_their_precision_memory_format_and_folding():
    opts = bench_cli.parse_args(TINY + ["--variants", "fp32", "bf16_cl_unfolded", "auto"])
    runs = {name: type_settings(vopts, "dih").run for name, vopts in variants(opts)}
    assert [(r.precision, r.memory_format, r.fold) for r in runs.values()] == [
        ("fp32", "contiguous", True), ("bf16", "channels_last", False), ("fp32", "contiguous", True)]
    assert list(runs) == ["fp32:", "bf16_cl_unfolded:", "auto:"]
    assert runs["auto:"].speed_reason == "float32: this CPU has no native bfloat16"  # conftest: no native bf16
    with pytest.raises(SystemExit):
        bench_cli.parse_args(TINY + ["--variants", "fp16"])


def test_variants_are_timed_in_one_run_with_the_matmul_peak(tmp_path):
    out = tmp_path / "variants.json"
    assert bench_cli.main(TINY + ["--methods", "ce", "--variants", "fp32_unfolded", "fp32", "--peak", "16", "--steps",
                                  "1", "--repeats", "1", "--warmup", "0", "--epoch_methods", "--test_images", "8",
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    tasks = {"teacher_inference", "cohort_inference", "ce"}
    assert set(result["steps"]) == {f"{v}:{t}" for v in ("fp32_unfolded", "fp32") for t in tasks} | {
        "matmul_fp32", "matmul_bf16"}
    assert {f"fp32:{t}_speedup_over_fp32_unfolded" for t in tasks} <= set(result["ratios"])
    assert set(result["floors_s"]) == {"fp32_unfolded:", "fp32:"} and result["targets"] == {}
    peak = result["peak"]
    assert peak["teacher_gflop_per_batch"] > 0 and peak["matmul_bf16_gflop_s"] > 0
    assert peak["fp32:teacher_inference_gflop_s"] > 0
