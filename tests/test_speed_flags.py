"""The speed flags keep the loss: --channels_last, --compile and --amp against the plain path on a fixed batch.

Every comparison goes through what ``fit`` runs (``prepare_step`` and ``forward_loss``). Tolerances, relative
to the plain float32 loss:
- channels_last: 1e-5 (the same arithmetic in another memory layout; only summation order may differ);
- compile: 1e-4 (inductor fuses and reorders float32 reductions);
- amp: 2e-2 (bfloat16 keeps 8 significant bits, about 0.4% per rounding; the losses themselves are float32).
``--amp`` is bfloat16 autocast on the training device, so on this CPU the tests exercise the real path.
"""
import copy
import json

import torch
from torch import nn

import train_funcs
from dihkit.files.checkpoints import atomic_save, model_record
from dih_utils import Cohort, build_heads
from models_repo import build_model
from console import TINY, make_ctx, run_inprocess
from dihkit.runs.method_contract import Method
from dihkit.runs.run_context import RunContext
from train_fine_tune import HeadTuning
from dihkit.foundations.settings import ModelSettings
from train_kd import Distillation, kd_objective

CLASSES = 10


def context(*flags: str):
    """A CPU run context whose settings are the console's with ``flags``."""
    return make_ctx(flags)


def fixed_batch(n: int = 16):
    """The same batch for every comparison."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g), torch.arange(n)


def dih_method() -> Distillation:
    """DIH: a res8 student, a frozen res8 teacher and its three heads (random weights, fixed seed)."""
    torch.manual_seed(0)
    teacher = build_model("res8", CLASSES)
    cohort = Cohort(teacher, build_heads(teacher, CLASSES, 32))
    return Distillation(build_model("res8", CLASSES), {}, cohort, kd_objective(ModelSettings("res14", "res8")))


def head_tuning_method() -> HeadTuning:
    """Head fine-tuning on a frozen res8 teacher (random weights, fixed seed)."""
    torch.manual_seed(0)
    teacher = build_model("res8", CLASSES)
    return HeadTuning(teacher, build_heads(teacher, CLASSES, 32), {})


def training_loss(method: Method, ctx: RunContext, backward: bool = False):
    """The float32 loss of one training forward as ``fit`` runs it (and the student's gradients)."""
    step_fn = train_funcs.prepare_step(method, ctx)
    method.train()
    loss, _ = train_funcs.forward_loss(step_fn, *fixed_batch(), ctx)
    if not backward:
        return loss.detach()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.student.parameters()]


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|."""
    return ((a - b).abs() / b.abs()).item()


def first_conv_weight(model: nn.Module) -> torch.Tensor:
    """The weight of the first convolution of ``model``."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight


def test_channels_last_loss_matches_and_reaches_the_frozen_cohort():
    plain = dih_method()
    flagged = copy.deepcopy(plain)
    expected = training_loss(plain, context())
    got = training_loss(flagged, context("--channels_last"))
    assert relative_gap(got, expected) < 1e-5
    # The cohort is not a submodule: fit must convert it as well as the student.
    for model in (flagged.student, flagged.cohort.teacher):
        assert first_conv_weight(model).is_contiguous(memory_format=torch.channels_last)


def test_amp_is_bfloat16_autocast_on_cpu_and_keeps_the_loss():
    ctx = context("--amp")
    with ctx.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        # The frozen cohort's pass runs under the same autocast as the student's.
        assert dih_method().cohort(fixed_batch()[0])[0].dtype == torch.bfloat16
    for build in (dih_method, head_tuning_method):
        expected = training_loss(build(), context())
        got = training_loss(build(), ctx)
        assert got.dtype == torch.float32
        assert relative_gap(got, expected) < 2e-2


def test_compile_loss_and_gradients_match():
    plain = dih_method()
    flagged = copy.deepcopy(plain)
    expected, expected_grads = training_loss(plain, context(), backward=True)
    got, grads = training_loss(flagged, context("--compile"), backward=True)
    assert relative_gap(got, expected) < 1e-4
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def test_console_trains_with_amp_and_channels_last(tmp_path):
    teacher = tmp_path / "teacher.pth"
    atomic_save(model_record(build_model("res14", CLASSES), "res14", CLASSES, "synthetic", 32), teacher)
    out = tmp_path / "kd.pth"
    code = run_inprocess(["--training_type", "kd", *TINY, "--train_subset", "200", "--saved_path", teacher,
                          "--path_to_save", out, "--amp", "--channels_last"])
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert torch.isfinite(torch.tensor(record["history"][0]["train_loss"]))
    assert set(record["reference_test"]) == {"teacher"} and 0 <= record["test_top1"] <= 100
