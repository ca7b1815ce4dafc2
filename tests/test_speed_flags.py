"""The speed flags keep the loss: channels-last, --compile and bfloat16 against the plain path on a fixed batch;
and ``--precision auto`` picks bfloat16 + channels-last only on a CPU with AMX-BF16, saying why.

Every comparison goes through what ``fit`` runs (``prepare_step`` and ``forward_loss``). Tolerances, relative
to the plain float32 loss:
- channels_last: 1e-5 (the same arithmetic in another memory layout; only summation order may differ);
- compile: 1e-4 (inductor fuses and reorders float32 reductions);
- bf16: 2e-2 (bfloat16 keeps 8 significant bits, about 0.4% per rounding; the losses themselves are float32).
``--precision bf16`` is bfloat16 autocast on the training device, so on this CPU the tests exercise the real path.
The suite's runs see a CPU without native bfloat16 (conftest), so ``auto`` is float32 unless a test says otherwise.

A flag that did nothing would keep the loss too, so each test also shows the flag acting inside the trainer's
forward: the step is a compiled module and Dynamo compiled a frame (``--compile``); the student's, the teacher's
and the heads' outputs are bfloat16 (``--precision bf16``); the input, the trained modules and the frozen cohort
are channels-last (``--memory_format channels_last``).
"""
import contextlib
import copy
import json

import pytest
import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

import train_funcs
from dihkit.files.checkpoints import atomic_save, model_record
from dih_utils import Cohort, build_heads
from dihkit.console import devices
from dihkit.console.devices import native_bfloat16, resolve_speed
from dihkit.foundations.settings import RunSettings
from models_repo import build_model
from console import TINY, make_ctx, run_inprocess
from dihkit.runs.method_contract import Method
from dihkit.runs.run_context import RunContext
from train_fine_tune import HeadTuning
from dihkit.foundations.settings import ModelSettings
from train_kd import Distillation, kd_objective

CLASSES = 10


def context(*flags: str, device: str = "cpu"):
    """A run context on ``device`` whose settings are the console's with ``flags``."""
    return make_ctx(flags, device=device)


def fixed_batch(n: int = 16, device: str = "cpu"):
    """The same batch for every comparison."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g), torch.arange(n)
    return [t.to(device) for t in batch]


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


def training_step(method: Method, ctx: RunContext):
    """The step callable ``fit`` runs (``prepare_step``: device, memory format, folded cohort, compile), the
    method in train mode."""
    step_fn = train_funcs.prepare_step(method, ctx)
    method.train()
    return step_fn


def training_loss(method: Method, ctx: RunContext, backward: bool = False, step_fn=None):
    """The float32 loss of one training forward as ``fit`` runs it (and the student's gradients)."""
    step_fn = training_step(method, ctx) if step_fn is None else step_fn
    loss, _ = train_funcs.forward_loss(step_fn, *fixed_batch(device=ctx.device.type), ctx)
    if not backward:
        return loss.detach()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.student.parameters()]


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|."""
    return ((a - b).abs() / b.abs()).item()


@contextlib.contextmanager
def recorded(modules, what, pre: bool = False):
    """A list that each module of ``modules`` adds ``what(inputs, output)`` to when it runs forward (``pre``:
    ``what(inputs)`` before it runs)."""
    seen = []
    if pre:
        handles = [m.register_forward_pre_hook(lambda m, inputs: seen.append(what(inputs))) for m in modules]
    else:
        handles = [m.register_forward_hook(lambda m, inputs, out: seen.append(what(inputs, out))) for m in modules]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def logits_dtype(inputs, out) -> torch.dtype:
    """The dtype of a model's logits (a ``features=True`` forward returns them first)."""
    return (out[0] if isinstance(out, tuple) else out).dtype


def convolution_weights(*models: nn.Module) -> list:
    """Every convolution weight of ``models`` with a kernel larger than 1x1 (where the two layouts differ)."""
    return [p for m in models for p in m.parameters() if p.dim() == 4 and p.shape[-1] > 1]


def test_channels_last_loss_matches_and_reaches_the_input_the_student_and_the_frozen_cohort():
    plain = dih_method()
    flagged = copy.deepcopy(plain)
    expected = training_loss(plain, context())
    ctx = context("--memory_format", "channels_last")
    step_fn = training_step(flagged, ctx)
    # The cohort is not a submodule (prepare_step folds it into new modules): fit must convert it apart.
    models = (flagged.student, flagged.cohort.teacher)
    with recorded(models, lambda inputs: inputs[0].is_contiguous(memory_format=torch.channels_last), pre=True) as seen:
        got = training_loss(flagged, ctx, step_fn=step_fn)
    assert relative_gap(got, expected) < 1e-5
    assert seen == [True, True], "the student's and the teacher's input are channels-last"
    weights = convolution_weights(flagged, flagged.cohort.teacher)  # every trained module, and the cohort
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in convolution_weights(plain.student))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_bf16_computes_the_trainers_forward_in_bfloat16_and_keeps_the_loss(device):
    ctx = context("--precision", "bf16", device=device)
    method = dih_method()
    step_fn = training_step(method, ctx)
    # Inside the trainer's forward: the student, the frozen teacher and its heads (one pass, the same autocast).
    models = (method.student, method.cohort.teacher, *method.cohort.heads)
    with recorded(models, logits_dtype) as dtypes:
        got = training_loss(method, ctx, step_fn=step_fn)
    assert dtypes == [torch.bfloat16] * 5
    assert got.dtype == torch.float32
    assert relative_gap(got, training_loss(dih_method(), context(device=device))) < 2e-2
    expected, got = (training_loss(head_tuning_method(), c) for c in (context(device=device), ctx))
    assert got.dtype == torch.float32 and relative_gap(got, expected) < 2e-2


def test_compile_compiles_the_step_and_keeps_loss_and_gradients():
    plain = dih_method()
    flagged = copy.deepcopy(plain)
    expected, expected_grads = training_loss(plain, context(), backward=True)
    ctx = context("--compile")
    step_fn = training_step(flagged, ctx)
    assert isinstance(step_fn, OptimizedModule) and step_fn._orig_mod is flagged
    counters.clear()
    got, grads = training_loss(flagged, ctx, backward=True, step_fn=step_fn)
    assert counters["frames"]["ok"] >= 1, "Dynamo compiled no frame of the step"
    assert relative_gap(got, expected) < 1e-4
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


CPU = torch.device("cpu")


@pytest.mark.parametrize("native, flags, expected", [
    ("AMX-BF16", {}, ("bf16", "channels_last", "bf16 + channels-last: this CPU has AMX-BF16")),
    ("AVX512-BF16", {}, ("fp32", "contiguous", "float32: this CPU has AVX512-BF16 but no AMX, where bfloat16 is "
                                                "not measured faster yet")),
    (None, {}, ("fp32", "contiguous", "float32: this CPU has no native bfloat16")),
    ("AMX-BF16", {"precision": "fp32"}, ("fp32", "contiguous", "float32: --precision")),
    ("AMX-BF16", {"memory_format": "contiguous"}, ("bf16", "contiguous", "bf16: this CPU has AMX-BF16, --memory_format")),
    (None, {"precision": "bf16"}, ("bf16", "channels_last", "bf16 + channels-last: --precision")),
])
def test_cpu_precision_follows_native_bfloat16(monkeypatch, native, flags, expected):
    monkeypatch.setattr(devices, "native_bfloat16", lambda: native)
    run = resolve_speed(RunSettings(**{"precision": "auto", "memory_format": "auto", **flags}), CPU)
    assert (run.precision, run.memory_format, run.speed_reason) == expected
    assert run.amp == (expected[0] == "bf16") and run.channels_last == (expected[1] == "channels_last")


def test_cuda_keeps_float32_by_default(monkeypatch):
    monkeypatch.setattr(devices, "native_bfloat16", lambda: "AMX-BF16")
    run = resolve_speed(RunSettings(precision="auto", memory_format="auto"), torch.device("cuda", 0))
    assert (run.precision, run.memory_format, run.speed_reason) == ("fp32", "contiguous", "float32: the default on cuda")


@pytest.mark.parametrize("caps, expected", [({"amx_bf16": True, "avx512_bf16": True}, "AMX-BF16"),
                                            ({"amx_bf16": False, "avx512_bf16": True}, "AVX512-BF16"),
                                            ({"avx2": True}, None)])
def test_native_bfloat16_reads_torchs_cpu_capabilities(monkeypatch, caps, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert native_bfloat16() == expected


@pytest.mark.parametrize("cap, expected", [("ALL", "AMX-BF16"), ("AVX512_CORE_AMX", "AMX-BF16"),
                                           ("AVX512_CORE_BF16", "AVX512-BF16"), ("AVX512_CORE", None),
                                           ("avx2", None)])
def test_onednns_isa_cap_hides_what_it_will_not_use(monkeypatch, cap, expected):
    """The suite runs under ONEDNN_MAX_CPU_ISA=AVX512_CORE (conftest) so that no machine computes in bf16."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": True})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert native_bfloat16() == expected


def test_console_on_an_amx_cpu_defaults_to_bf16_and_channels_last(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devices, "native_bfloat16", lambda: "AMX-BF16")
    teacher = tmp_path / "teacher.pth"
    atomic_save(model_record(build_model("res14", CLASSES), "res14", CLASSES, "synthetic", 32), teacher)
    out = tmp_path / "kd.pth"
    code = run_inprocess(["--training_type", "kd", *TINY, "--train_subset", "200", "--saved_path", teacher,
                          "--path_to_save", out])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "precision: bf16 + channels-last: this CPU has AMX-BF16"
    assert "frozen cohort: 15 batch norms folded into the convolutions before them" in printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["precision"], record["memory_format"]) == ("bf16", "channels_last")
    assert record["speed_reason"] == "bf16 + channels-last: this CPU has AMX-BF16"
    assert torch.isfinite(torch.tensor(record["history"][0]["train_loss"]))
    assert set(record["reference_test"]) == {"teacher"} and 0 <= record["test_top1"] <= 100
