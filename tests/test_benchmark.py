"""The CIFAR-100 distillation benchmark's models (RepDistiller, mdistiller) and their published checkpoints.

Each architecture's published key layout is a hand-written fixture (tests/fixtures/upstream_keys); a file in
their checkpoint format is made from it with seeded weights and batch-norm statistics, loaded through the
toolkit's public path and compared with an independent forward of the same tensors (tests/upstream_layout.py).
"""
import importlib.util

import pytest
import torch
import torchvision.datasets.cifar

from console import ROOT, run_inprocess
from dihkit.files.checkpoints import load_model_file, safe_load
from dihkit.foundations.errors import UserError
from models_repo import BENCHMARK, build_model, count_parameters
from test_models import check_mounts
from test_seed_commands import write_tiny_cifar100
from upstream_layout import forward_of, layout, parameter_count, random_state

# The published networks' parameters at 100 classes (REFERENCE.md section 6b; vgg11_crd is their vgg11).
PUBLISHED = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11_crd": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528, "ResNet50": 23_705_252,
}
# (channels, stride relative to a 32-px input) of each mount point; at 64 px the same strides, but the VGGs'
# fourth pool halves their fourth mount too (it pools maps larger than 4x4, as theirs does for 64-px input).
# The VGGs' are RepDistiller's feature points, feat[1:-1] of its vgg.py forward: blocks 1-4 before their pools.
MOUNTS = {
    **{f"resnet{d}": [(16, 1), (32, 2), (64, 4)] for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": [(64, 1), (128, 2), (256, 4)], "resnet32x4": [(64, 1), (128, 2), (256, 4)],
    "wrn_16_1": [(16, 1), (32, 2), (64, 4)], "wrn_40_1": [(16, 1), (32, 2), (64, 4)],
    "wrn_16_2": [(32, 1), (64, 2), (128, 4)], "wrn_40_2": [(32, 1), (64, 2), (128, 4)],
    **{name: [(128, 2), (256, 4), (512, 8), (512, 8)] for name in ("vgg8", "vgg11_crd", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": [(12, 2), (16, 4), (48, 8), (160, 16)],
    "ShuffleV1": [(240, 2), (480, 4), (960, 8)], "ShuffleV2": [(116, 2), (232, 4), (464, 8)],
    "ResNet50": [(256, 1), (512, 2), (1024, 4), (2048, 8)],
}
# One architecture of each family runs by default (ResNet50 is the only one of bottleneck blocks: about 5 s, its
# forward at 32 px against the published layout's catches a stride on the wrong conv); the others under --runslow.
DEFAULT = {"resnet8", "resnet8x4", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"}
EACH = [a if a in DEFAULT else pytest.param(a, marks=pytest.mark.slow) for a in PUBLISHED]


def published_file(path, arch: str, seed: int = 0) -> dict:
    """Write a checkpoint as RepDistiller's train_teacher.py saves it, with ``arch``'s published layout."""
    state = random_state(layout(arch), seed)
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(72.34),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "momentum": 0.9, "params": [0]}]}}, path)
    return state


def test_the_zoo_has_the_published_parameter_counts():
    assert set(BENCHMARK) == set(PUBLISHED)
    with torch.device("meta"):
        counts = {name: count_parameters(build_model(name, 100)) for name in PUBLISHED}
    assert counts == PUBLISHED
    # The fixtures are facts about the published layouts: their own counts must agree too.
    assert {name: parameter_count(layout(name)) for name in PUBLISHED} == PUBLISHED


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("arch", EACH)
def test_mount_points_heads_and_eval_mode(arch, size):
    shapes = [(c, size // s, size // s) for c, s in MOUNTS[arch]]
    if arch.startswith("vgg") and size == 64:
        shapes[3] = (512, 4, 4)
    model = build_model(arch, 7)
    check_mounts(model, size, shapes)
    with torch.no_grad():  # the deep auxiliary classifiers' path (TOFD) gives the same logits
        x = torch.randn(2, 3, size, size)
        logits, feats, _ = model(x, features=True)
        for i, f in enumerate(feats):
            torch.testing.assert_close(model.forward_from(i, f), logits)


@pytest.mark.parametrize("arch", EACH)
def test_a_published_checkpoint_loads_and_computes_the_same_function(arch, tmp_path, capsys):
    path = tmp_path / "ckpt_epoch_240.pth"
    state = published_file(path, arch)
    model = build_model(arch, 100)
    load_model_file(path, model, arch, 100, "teacher checkpoint", "cifar100")
    assert (f"is a RepDistiller/mdistiller {arch} file, epoch 240, accuracy 72.34: its {len(state)} tensors "
            f"were renamed") in capsys.readouterr().err
    # A bijection: every published tensor has one place, and the model has no other.
    assert len(model.state_dict()) == len(state)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.double().eval()(x), forward_of(arch)(weights, x), rtol=1e-9, atol=1e-9)


def test_a_published_student_file_loads_too(tmp_path, capsys):
    # RepDistiller's train_student.py saves {'model': state_dict} only: no epoch or accuracy to report.
    state = random_state(layout("resnet8x4"), 2)
    torch.save({"model": state}, tmp_path / "resnet8x4_best.pth")
    model = build_model("resnet8x4", 100).double().eval()
    load_model_file(tmp_path / "resnet8x4_best.pth", model, "resnet8x4", 100, "checkpoint")
    assert "is a RepDistiller/mdistiller resnet8x4 file: its" in capsys.readouterr().err
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    weights = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), forward_of("resnet8x4")(weights, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("published, arch, message", [
    ("resnet110", "resnet56", r"key 'layer1\.9\.conv1\.weight' \(16, 16, 3, 3\) has no counterpart in a resnet56"),
    ("wrn_40_2", "resnet56", r"key 'block1\.layer\.0\.bn1\.weight' \(16,\) matches none of its rules"),
    ("resnet8x4", "resnet8", r"key 'conv1\.weight' has shape \(32, 3, 3, 3\), a resnet8 needs \(16, 3, 3, 3\)"),
    ("resnet20", "resnet56", r"lacks the tensor this toolkit names 'stages\.0\.3\.conv1\.weight'"),
    ("vgg11_crd", "vgg11", r"no RepDistiller/mdistiller rule exists for a vgg11 \(their vgg11 is vgg11_crd"),
])
def test_a_file_of_another_architecture_is_refused_naming_the_key(published, arch, message, tmp_path):
    path = tmp_path / "ckpt.pth"
    published_file(path, published)
    with pytest.raises(UserError, match=message):
        load_model_file(path, build_model(arch, 100), arch, 100, "teacher checkpoint")


def import_script():
    """scripts/import_checkpoint.py as a module."""
    spec = importlib.util.spec_from_file_location("import_checkpoint", ROOT / "scripts" / "import_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric_lines(text: str) -> list[str]:
    """The test mode's table rows (model, top-1, top-5)."""
    return [line for line in text.splitlines() if line.startswith(("resnet56 ", "model "))]


def test_the_console_evaluates_a_published_file_and_its_conversion_alike(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: path and
                        __import__("os").path.isfile(path))
    write_tiny_cifar100(tmp_path / "data")
    published, converted = tmp_path / "ckpt_epoch_240.pth", tmp_path / "resnet56.pth"
    published_file(published, "resnet56")
    common = ["--training_type", "test", "--dataset", "cifar100", "--data_dir", tmp_path / "data", "--gpu_id", "cpu"]
    assert run_inprocess([*common, "--teacher", "resnet56", "--saved_path", published]) == 0
    out, err = capsys.readouterr()
    assert err.count("RepDistiller/mdistiller resnet56 file") == 1
    assert run_inprocess([*common, "--teacher", "resnet20", "--saved_path", published]) == 2
    assert "key 'layer1.3.conv1.weight' (16, 16, 3, 3) has no counterpart in a resnet20" in capsys.readouterr().err

    assert import_script().main(["--arch", "resnet56", str(published), str(converted)]) == 0
    record = safe_load(converted, "checkpoint")  # checks the recorded digest
    assert (record["arch"], record["num_classes"], record["dataset"], record["image_size"]) == ("resnet56", 100,
                                                                                                 "cifar100", 32)
    assert record["upstream_epoch"] == 240 and record["upstream_accuracy"] == pytest.approx(72.34)
    capsys.readouterr()
    assert run_inprocess([*common, "--saved_path", converted]) == 0  # the architecture comes from the file
    again, err = capsys.readouterr()
    assert "RepDistiller" not in err and metric_lines(again) == metric_lines(out) and len(metric_lines(out)) == 2
    models = [build_model("resnet56", 100).eval() for _ in range(2)]
    for model, path in zip(models, (published, converted)):
        load_model_file(path, model, "resnet56", 100)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models[0](x), models[1](x))


def test_the_import_script_refuses_a_file_of_another_architecture(tmp_path, capsys):
    published_file(tmp_path / "ckpt.pth", "wrn_40_2")
    assert import_script().main(["--arch", "resnet56", str(tmp_path / "ckpt.pth"), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "block1.layer.0.bn1.weight" in err
    assert not (tmp_path / "out.pth").exists()
