"""Frozen models folded for inference: batch norms folded into the convolutions before them give the same logits,
stage outputs and embedding (float32, 1e-4 relative) for every architecture in the registry, fold nothing that
the dataflow forbids, leave the given modules untouched, and are what a run's cohort computes with."""
import pytest
import torch
from torch import nn

from bench.timing import generated_data
from console import make_ctx
from dih_utils import Cohort, build_heads, fingerprint, freeze
from dihkit.foundations.settings import ModelSettings
from dihkit.runs.folding import folded
from dihkit.runs.run_outputs import RunPaths
from models_repo import MODELS, build_model
from models_repo.base import StagedNet
from train_funcs import Trainer
from train_kd import Distillation, kd_objective

CLASSES = 10


def randomise_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a fold changes every weight."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for tensor, lo, hi in ((m.running_mean, -1.0, 1.0), (m.running_var, 0.3, 3.0), (m.weight, 0.5, 1.5),
                                   (m.bias, -0.5, 0.5)):
                tensor.data.copy_(torch.empty(tensor.shape).uniform_(lo, hi, generator=g))
    return freeze(model)


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Logits, every stage output and the embedding of a registry model."""
    with torch.no_grad():
        logits, feats, emb = model(x, features=True)
    return [logits, *feats, emb]


def batch_norm_count(model: nn.Module) -> int:
    """How many batch norms ``model`` holds."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch", list(MODELS))
def test_folded_model_matches_for_every_registered_architecture(arch):
    torch.manual_seed(0)
    model = randomise_batch_norms(build_model(arch, CLASSES))
    before = batch_norm_count(model)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = outputs(model, x)
    fast, count = folded(model)
    assert count > 0, f"{arch}: no batch norm folded"
    assert batch_norm_count(fast) == before - count
    for got, want in zip(outputs(fast, x), expected, strict=True):
        assert relative(got, want) < 1e-4
    assert batch_norm_count(model) == before  # the model given is left as it was


def test_a_stage_output_is_never_folded_into_the_next_stages_batch_norm():
    """Stage 1 ends with a bare convolution and stage 2 opens with a batch norm (a pre-activation block): the
    convolution's output is a mount point the cohort reads, so folding the pair would change that feature."""
    stages = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())]
    model = randomise_batch_norms(StagedNet(nn.Identity(), stages, nn.Identity(), 8, CLASSES))
    x = torch.randn(2, 3, 8, 8)
    fast, count = folded(model)
    assert count == 0
    for got, want in zip(outputs(fast, x), outputs(model, x), strict=True):
        assert torch.equal(got, want)


class ShapeUnpacking(nn.Module):
    """A forward fx cannot trace (it unpacks the input's shape) around a foldable conv-BN pair."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        """The body's output, reshaped with the unpacked sizes."""
        n, _, h, w = x.shape
        return self.body(x).reshape(n, -1, h * w)


def test_an_untraceable_module_is_folded_child_by_child():
    model = randomise_batch_norms(ShapeUnpacking())
    x = torch.randn(2, 3, 5, 5)
    fast, count = folded(model)
    assert count == 1 and isinstance(fast.body[1], nn.Identity)
    assert relative(fast(x), model(x)) < 1e-5


def test_a_run_folds_its_cohort_and_records_the_unfolded_fingerprint(tmp_path):
    """The trainer folds the frozen teacher it distils from, and resume keys on the weights as loaded."""
    torch.manual_seed(0)
    teacher = randomise_batch_norms(build_model("res8", CLASSES))
    heads = build_heads(teacher, CLASSES, 32)
    expected_id = fingerprint(nn.ModuleList([teacher, heads]))
    method = Distillation(build_model("res8", CLASSES), {}, Cohort(teacher, heads), kd_objective(ModelSettings("res8", "res8")))
    ctx = make_ctx(["--training_type", "kd"], data=generated_data("cifar10", 8, 8), out=tmp_path / "kd.pth")
    trainer = Trainer(method, ctx, RunPaths.for_output(ctx.out), ctx.cfg.optim, "kd", {})
    assert trainer.cohort_id == expected_id
    assert batch_norm_count(method.cohort.teacher) == 0 and batch_norm_count(teacher) > 0



def test_tofd_and_mhkd_cohorts_give_the_same_outputs_folded():
    """Their frozen heads carry batch norms of their own (TOFD: copies of the later stages; MHKD: conv-BN-ReLU)."""
    import training_types  # noqa: F401  (the methods' modules import the registry's types)
    from MHKD.mhkd import build_multi_heads
    from TOFD.tofd import build_aux, classifier_outputs
    teacher = randomise_batch_norms(build_model("res8", CLASSES))
    x = torch.randn(2, 3, 32, 32)
    tofd = (randomise_batch_norms(build_aux("res8", CLASSES), 1),
            lambda c: [t for pair in classifier_outputs(c.teacher, c.heads, x) for t in pair])
    mhkd = (randomise_batch_norms(build_multi_heads(teacher, CLASSES, 32), 2), lambda c: c(x))
    for heads, run in (tofd, mhkd):
        cohort = Cohort(teacher, heads)
        with torch.no_grad():
            expected = run(cohort)
            assert cohort.fold() > batch_norm_count(teacher)  # the heads' batch norms are folded too
            got = run(cohort)
        for g, e in zip(got, expected, strict=True):
            assert relative(g, e) < 1e-4
