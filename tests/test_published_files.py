"""Files from any PyTorch and evaluation as the reference network computes it (issue 29): a RepDistiller file of
PyTorch 0.4.0 (no ``num_batches_tracked``) or of DataParallel (``module.`` keys) scores in ``test`` mode exactly as
its reference forward predicts, in float32 even on a CPU whose training default is bfloat16; refusals name the
file's own tensors; a plain state dict is loaded only as the architecture the command names; the benchmark VGGs
mount at RepDistiller's feature points, and their earlier layout still loads.
"""
import os

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

import dataload
import train_funcs
from console import make_ctx, run_inprocess
from dih_utils import Cohort
from dihkit.console import devices
from dihkit.files.checkpoints import atomic_save, load_model_file, model_record
from dihkit.foundations.errors import UserError
from dihkit.runs.evaluation import evaluate_outputs
from dihkit.foundations.settings import ModelSettings
from models_repo import build_model
from test_seed_commands import dump_py2
from train_kd import Distillation, kd_objective
from upstream_layout import bn, conv, forward_of, layout, random_state

# The DIH authors' dataload.py CIFAR-100 constants: what the default recipe (dih) normalises with.
DIH_MEAN, DIH_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
TEST_IMAGES = 200


def write_cifar100(folder, images: np.ndarray, labels: list) -> None:
    """``folder/cifar-100-python`` in the archive's pickled format: ``images`` (N, 3, 32, 32) uint8 as the test
    split with ``labels``, and one training image per class."""
    rng = np.random.default_rng(1)
    for name, data, fine in (("train", rng.integers(0, 256, (100, 3072), dtype=np.uint8), list(range(100))),
                             ("test", images.reshape(len(images), -1), labels)):
        dump_py2(folder / "cifar-100-python" / name,
                 {"filenames": [f"img_{i}.png" for i in range(len(fine))], "batch_label": f"{name}ing batch 1 of 1",
                  "fine_labels": fine, "coarse_labels": [label // 5 for label in fine], "data": data})
    dump_py2(folder / "cifar-100-python" / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                                                    "coarse_label_names": [f"coarse_{i}" for i in range(20)]})


@pytest.fixture(scope="module")
def labelled_by_the_reference(tmp_path_factory):
    """A RepDistiller resnet20 (seeded weights) and a CIFAR-100 folder whose test labels are that network's own
    float32 predictions (its independent forward, inputs normalised with the DIH authors' constants).

    The images are 4x4 random blocks of 8x8 pixels (smooth, like photographs, rather than pixel noise). Every
    class's bias is 8: the features alone rank the classes, but the logits sit where bfloat16's step is 1/16, so
    a bfloat16 evaluation misses 4% of these labels (measured) and a float32 one none."""
    folder = tmp_path_factory.mktemp("reference")
    state = {**random_state(layout("resnet20"), 5), "fc.bias": torch.full((100,), 8.0)}
    blocks = np.random.default_rng(0).integers(0, 256, (TEST_IMAGES, 3, 4, 4), dtype=np.uint8)
    images = blocks.repeat(8, axis=2).repeat(8, axis=3)
    x = torch.from_numpy(images).float() / 255
    x = (x - torch.tensor(DIH_MEAN).view(1, 3, 1, 1)) / torch.tensor(DIH_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = forward_of("resnet20")(state, x).argmax(1).tolist()
    write_cifar100(folder / "data", images, labels)
    return folder, state


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's CIFAR loader checks the archive's md5: the written files pass when they exist."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: bool(path)
                        and os.path.isfile(path))


def test_top1(argv, capsys) -> float:
    """Run the test mode; the evaluated model's top-1 from its printed row."""
    assert run_inprocess(argv) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resnet20 "))
    return float(row.split()[1])


test_top1.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("variant", ["pytorch_0.4.0", "dataparallel"])
def test_a_published_file_of_any_pytorch_scores_as_its_reference_on_an_amx_cpu(variant, labelled_by_the_reference,
                                                                              no_md5, tmp_path, monkeypatch, capsys):
    folder, state = labelled_by_the_reference
    if variant == "pytorch_0.4.0":  # RepDistiller's README names PyTorch 0.4.0, whose batch norms have no counter
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:  # a model wrapped in DataParallel saves every key under module.
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 240, "model": state, "accuracy": 70.0}, tmp_path / "ckpt_epoch_240.pth")
    # A CPU with AMX: the default --precision auto trains in bfloat16 there; evaluation stays float32.
    monkeypatch.setattr(devices, "native_bfloat16", lambda: "AMX-BF16")
    argv = ["--training_type", "test", "--dataset", "cifar100", "--data_dir", folder / "data", "--gpu_id", "cpu",
            "--teacher", "resnet20", "--saved_path", tmp_path / "ckpt_epoch_240.pth"]
    assert test_top1(argv, capsys) == 100.0
    # The negative control: evaluating in bfloat16 (what this mode did by default before) misses some of them.
    assert test_top1([*argv, "--eval_precision", "bf16"], capsys) < 99.0


def test_training_computes_in_bfloat16_and_evaluation_in_float32_on_an_amx_cpu(monkeypatch):
    monkeypatch.setattr(devices, "native_bfloat16", lambda: "AMX-BF16")
    split = dataload.Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10)
    data = dataload.DataBundle(dataload.known_info("synthetic"), split, None, split)
    torch.manual_seed(0)
    seen = {}

    def evaluate(x):
        out = method.evaluate(x)
        seen.setdefault("evaluation", out["student"].dtype)
        return out

    for flags, expected in (([], torch.float32), (["--eval_precision", "bf16"], torch.bfloat16)):
        ctx = make_ctx(flags, data=data)
        assert ctx.cfg.run.amp, "--precision auto trains in bfloat16 on an AMX CPU"
        method = Distillation(build_model("res8", 10), {}, Cohort(build_model("res8", 10)),
                              kd_objective(ModelSettings("res8", "res8")))
        step = train_funcs.prepare_step(method, ctx)
        method.train()
        _, logits = train_funcs.forward_loss(step, torch.randn(4, 3, 32, 32), torch.arange(4), torch.arange(4), ctx)
        method.eval()
        seen.clear()
        evaluate_outputs(evaluate, split, ctx)
        assert (logits.dtype, seen["evaluation"]) == (torch.bfloat16, expected)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_nan_in_a_published_file_is_named_by_the_files_own_key(prefix, tmp_path):
    state = random_state(layout("resnet20"), 0)
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"model": {prefix + k: v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    with pytest.raises(UserError) as info:
        load_model_file(tmp_path / "ckpt.pth", build_model("resnet20", 100), "resnet20", 100, "teacher checkpoint")
    assert (f"holds non-finite weights: tensor '{prefix}layer2.0.conv1.weight' (this toolkit's "
            f"'stages.1.0.conv1.weight') has NaN or infinite values") in str(info.value)


def test_a_nan_in_a_toolkit_file_is_named_once(tmp_path):
    model = build_model("res8", 10)
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    atomic_save(model_record(model, "res8", 10, "synthetic", 32), tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"tensor 'fc\.bias' has NaN or infinite values$"):
        load_model_file(tmp_path / "m.pth", build_model("res8", 10), "res8", 10)


# ----------------------------------------------------------------------------- the VGGs and their layouts

def repdistiller_vgg_features(w: dict, x: torch.Tensor) -> list:
    """RepDistiller's vgg.py ``forward(is_feat=True)`` at 32 px, independently: ``feat[1:-1]``, the ReLU outputs of
    blocks 1-4, each before the max-pool that follows it (none follows blocks 3 and 4 at 32 px)."""
    feats = []
    for b in range(5):
        for j in sorted({int(k.split(".")[1]) for k in w if k.startswith(f"block{b}.")})[::2]:
            x = torch.relu(bn(conv(x, w, f"block{b}.{j}"), w, f"block{b}.{j + 1}"))
        if b:
            feats.append(x)
        x = torch.max_pool2d(x, 2) if b < 3 else x
    return feats


def test_the_benchmark_vggs_mount_at_repdistillers_feature_points(tmp_path):
    state = random_state(layout("vgg13"), 3)
    torch.save({"model": state}, tmp_path / "vgg13.pth")
    model = build_model("vgg13", 100).double().eval()
    load_model_file(tmp_path / "vgg13.pth", model, "vgg13", 100)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, feats, _ = model(x, features=True)
        weights = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
        expected = repdistiller_vgg_features(weights, x)
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def earlier_layout(state: dict) -> dict:
    """A benchmark VGG's tensors under this toolkit's earlier names: block 0 was stage 0, block 4 the tail."""
    def name(key):
        if key.startswith("stem."):
            return "stages.0." + key[len("stem."):]
        if key.startswith("stages.3."):
            return "tail." + key[len("stages.3."):]
        if key.startswith("stages."):
            k, rest = key[len("stages."):].split(".", 1)
            return f"stages.{int(k) + 1}.{rest}"
        return key
    return {name(k): v for k, v in state.items()}


def test_a_toolkit_file_of_a_benchmark_vgg_in_the_earlier_layout_loads_as_the_same_network(tmp_path, capsys):
    torch.manual_seed(0)
    trained = build_model("vgg8", 10).eval()
    record = model_record(trained, "vgg8", 10, "synthetic", 32)
    record["state_dict"] = earlier_layout(record["state_dict"])
    assert any(k.startswith("tail.") for k in record["state_dict"])
    atomic_save(record, tmp_path / "vgg8.pth")
    model = build_model("vgg8", 10).eval()
    load_model_file(tmp_path / "vgg8.pth", model, "vgg8", 10)
    assert "holds a vgg8 in this toolkit's earlier layout" in capsys.readouterr().err
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_a_plain_state_dict_two_networks_fit_is_loaded_only_as_the_one_named(tmp_path, capsys):
    # The seed's vgg11 and RepDistiller's vgg11 (vgg11_crd) hold the same tensors; in this toolkit's earlier
    # layout of vgg11_crd even under the same names. A plain state dict records no architecture: the default
    # --teacher (res110) does not fit it, and the refusal says how to name either.
    classes = dataload.known_info("synthetic").num_classes
    torch.save(build_model("vgg11", classes).state_dict(), tmp_path / "plain.pth")
    argv = ["--training_type", "test", "--dataset", "synthetic", "--gpu_id", "cpu",
            "--saved_path", tmp_path / "plain.pth"]
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err
    assert ("is a plain state dict, which records no architecture, and it does not fit a res110; its tensors fit "
            "vgg11 and vgg11_crd (in this toolkit's earlier layout): name its architecture (--teacher vgg11 or "
            "--teacher vgg11_crd)") in err and err.count("\n") == 1
    # Named, it loads as that network.
    load_model_file(tmp_path / "plain.pth", build_model("vgg11", classes), "vgg11", classes)
    load_model_file(tmp_path / "plain.pth", build_model("vgg11_crd", classes), "vgg11_crd", classes)
    assert "holds a vgg11_crd in this toolkit's earlier layout" in capsys.readouterr().err
