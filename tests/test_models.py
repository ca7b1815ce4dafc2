"""Every registry model: logits and mount-point shapes at 32 and 64 pixels, and parameter counts."""
import pytest
import torch

from dih_utils import build_heads
from dihkit.foundations.errors import UserError
from models_repo import BENCHMARK, IMAGENET, MODELS, build_model, count_parameters

# The method's table (REFERENCE.md section 3), 100 classes; approximate ones within 1%.
EXPECTED_PARAMS = {"res8": 83_892, "res14": 181_108, "res20": 278_324, "res110": 1_736_564,
                   "res18": 11_220_132, "res34": 21_328_292, "vgg11": 9_280_000, "wrn-28-2": 1_470_000}
# (channels, stride relative to the input) of each mount point.
MOUNTS = {
    "res8": [(16, 1), (32, 2), (64, 4)], "res14": [(16, 1), (32, 2), (64, 4)],
    "res20": [(16, 1), (32, 2), (64, 4)], "res110": [(16, 1), (32, 2), (64, 4)],
    "res18": [(64, 1), (128, 2), (256, 4), (512, 8)], "res34": [(64, 1), (128, 2), (256, 4), (512, 8)],
    "vgg11": [(64, 2), (128, 4), (256, 8), (512, 16)], "wrn-28-2": [(32, 1), (64, 2), (128, 4)],
}


# The seed's architectures; the benchmark's (their counts, mounts and checkpoints) are in test_benchmark.py,
# the ImageNet networks' in test_imagenet_models.py.
SEED = [name for name in MODELS if name not in BENCHMARK and name not in IMAGENET]


def test_registry_names():
    assert set(SEED) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", SEED)
def test_parameter_count(name):
    got = count_parameters(build_model(name, 100))
    assert abs(got - EXPECTED_PARAMS[name]) <= 0.01 * EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", ["res8", "res20", "res110", "res18"])
def test_exact_counts_of_the_resnets(name):
    assert count_parameters(build_model(name, 100)) == EXPECTED_PARAMS[name]


def check_mounts(model, size: int, shapes: list) -> None:
    """``model`` (7 classes) in eval mode at ``size`` px: its mount points have ``shapes`` (C, H, W), the
    embedding its width, a sample's logits do not depend on the batch, and a head fits each mount point."""
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, feats, emb = model(x, features=True)
        # In eval mode a sample's logits depend on that sample alone (batch norm uses its running statistics,
        # not the batch's), and the plain forward returns the logits of the feature forward.
        alone = model(x[1:])
    assert torch.allclose(alone, logits[1:], rtol=1e-4, atol=1e-5)
    assert logits.shape == (2, 7)
    assert [tuple(f.shape[1:]) for f in feats] == shapes
    assert emb.shape == (2, model.embedding_dim)
    heads = build_heads(model, 7, size)
    assert len(heads) == len(shapes)
    for head, f, (c, h, w) in zip(heads, feats, shapes):
        assert head.fc.in_features == c * h * w and head(f).shape == (2, 7)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", SEED)
def test_shapes(name, size):
    check_mounts(build_model(name, 7), size, [(c, size // s, size // s) for c, s in MOUNTS[name]])


def test_forward_from_matches_forward():
    model = build_model("res14", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats, _ = model(x, features=True)
        for i, f in enumerate(feats):
            assert torch.allclose(model.forward_from(i, f), logits, atol=1e-6)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'res9'"):
        build_model("res9", 10)
