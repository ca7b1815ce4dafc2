"""The ImageNet networks: torchvision's ResNet-18/34/50 and MobileNetV2, mdistiller's MobileNetV1.

torchvision (installed) is the reference implementation: its models give the parameter counts, and a state dict
saved from one must load as a teacher and compute the very same function. mdistiller's MobileNetV1 is checked
against a hand-written fixture of its published key layout and an independent forward (tests/upstream_layout.py).
Also here: their mount points and the pooled DIH heads, the names resolved by image size, the ImageNet recipes.
"""
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision

import dataload
from bench import bench as bench_cli
from bench.bench import variant_tasks
from bench.timing import generated_data
from console import run_inprocess
from dih_utils import FLATTEN, build_heads, load_heads, save_heads
from dihkit.console.console_flags import build_parser
from dihkit.console.model_names import resolve_models
from dihkit.console.recipe_flags import parse_command
from dihkit.files.checkpoints import FORMAT, atomic_save, load_model_file, model_record, safe_load
from dihkit.foundations.errors import UserError
from dihkit.foundations.recipes import resolve
from faults import make_imagefolder
from models_repo import IMAGENET, build_model, count_parameters
from models_repo.names import LARGE_IMAGE_PX, resolve_name
from models_repo.upstream import from_upstream
from upstream_layout import forward_of, layout, parameter_count, random_state

TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
# (channels, stride) of each mount point: torchvision's layer1..4 outputs; MobileNetV2 after its groups 2, 3, 5
# and 7 (24, 32, 96, 320 channels); mdistiller's MobileNetV1 feature maps after its units 3, 5, 11 and 13.
MOUNTS = {
    "resnet18": [(64, 4), (128, 8), (256, 16), (512, 32)], "resnet34": [(64, 4), (128, 8), (256, 16), (512, 32)],
    "resnet50": [(256, 4), (512, 8), (1024, 16), (2048, 32)],
    "mobilenet_v2": [(24, 4), (32, 8), (96, 16), (320, 32)],
    "mobilenet_v1": [(128, 4), (256, 8), (512, 16), (1024, 32)],
}
# Howard et al. (2017) give 4.2M for MobileNet 1.0-224; the count of mdistiller's layout at 1000 classes:
# 32 * 27 (first conv) + sum over the 13 blocks of 9 * c_in + c_in * c_out, + 2 per BN channel, + fc 1024 * 1000 + 1000.
MOBILENET_V1_PARAMS = 4_231_976
CPU = torch.device("cpu")


def torchvision_model(arch: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """torchvision's ``arch`` with seeded weights and non-trivial batch-norm affine maps and statistics (so a
    batch norm loaded in the wrong place changes the function), in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_mean = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


@pytest.mark.parametrize("arch", TORCHVISION)
def test_the_parameter_counts_and_the_tensors_are_torchvisions(arch):
    with torch.device("meta"):
        ours, theirs = build_model(arch, 1000), getattr(torchvision.models, arch)(weights=None)
        expected = {k: v.shape for k, v in ours.state_dict().items()}
    assert count_parameters(ours) == count_parameters(theirs)
    # Every torchvision tensor has exactly one place of its shape here, and the model has no other.
    assert from_upstream(theirs.state_dict(), arch, expected, "torchvision").keys() == expected.keys()


def test_mobilenet_v1_has_mdistillers_layout_and_count():
    with torch.device("meta"):
        assert count_parameters(build_model("mobilenet_v1", 1000)) == MOBILENET_V1_PARAMS
    assert parameter_count(layout("MobileNetV1")) == MOBILENET_V1_PARAMS


def test_an_mdistiller_mobilenet_v1_file_loads_and_computes_the_same_function(tmp_path, capsys):
    state = random_state(layout("MobileNetV1"), 3)
    torch.save({"model": state}, tmp_path / "student_best")
    model = build_model("mobilenet_v1", 1000)
    load_model_file(tmp_path / "student_best", model, "mobilenet_v1", 1000, "checkpoint")
    assert "is a mdistiller mobilenet_v1 file: its 164 tensors were renamed" in capsys.readouterr().err
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.double().eval()(x), forward_of("MobileNetV1")(weights, x), rtol=1e-9,
                                   atol=1e-9)


# ResNet-34's blocks are ResNet-18's (their renaming is checked for all four above): its files cost seconds.
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "resnet34" else a
                                  for a in TORCHVISION])
def test_a_torchvision_state_dict_and_its_toolkit_file_compute_torchvisions_function(arch, tmp_path, capsys):
    reference = torchvision_model(arch, 10)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    model = build_model(arch, 10)
    meta = load_model_file(tmp_path / "tv.pth", model, arch, 10, "teacher checkpoint")
    assert meta["source"] == "torchvision"
    assert f"is a torchvision {arch} file: its {len(reference.state_dict())} tensors" in capsys.readouterr().err
    # The toolkit's own file of the loaded model loads back, without renaming.
    atomic_save(model_record(model, arch, 10, "imagefolder", 64), tmp_path / "own.pth")
    again = build_model(arch, 10)
    load_model_file(tmp_path / "own.pth", again, arch, 10, "teacher checkpoint")
    assert capsys.readouterr().err == ""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = reference.double()(x)
        torch.testing.assert_close(model.double().eval()(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(again.double().eval()(x), expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def torchvision_world(tmp_path_factory):
    """A generated 64-px image folder (10 classes) and a seeded torchvision ResNet-18 for it, saved as torchvision
    saves a state dict: (folder, the model, the file, the console flags that read them)."""
    root = tmp_path_factory.mktemp("torchvision_world")
    data = make_imagefolder(root / "data", train_per_class=4, test_per_class=3, size=64, classes=10)
    reference = torchvision_model("resnet18", 10, seed=4)
    torch.save(reference.state_dict(), root / "resnet18.pth")
    flags = ["--teacher", "resnet18", "--saved_path", root / "resnet18.pth", "--dataset", "imagefolder", "--data_dir",
             data, "--no_cache", "--num_workers", "0", "--epochs", "1", "--batch_size", "20", "--seed", "3",
             "--gpu_id", "cpu"]
    return data, reference, flags


def test_kd_teaches_from_a_torchvision_file_as_torchvision_computes_it(torchvision_world, tmp_path):
    """A bare torchvision state dict is the console's kd teacher: the frozen teacher's recorded test loss and
    accuracy are those of torchvision's own model on the same test images."""
    data, reference, flags = torchvision_world
    out = tmp_path / "kd.pth"
    assert run_inprocess(["--training_type", "kd", *flags, "--student", "mobilenet_v1", "--path_to_save", out]) == 0
    recorded = json.loads(out.with_suffix(".json").read_text())["reference_test"]["teacher"]
    bundle = dataload.load_data("imagefolder", str(data))
    x, y, _ = next(dataload.eval_batches(bundle.test, bundle.info, len(bundle.test), CPU))
    with torch.no_grad():
        logits = reference(x)
    assert recorded["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    assert recorded["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_dih_runs_on_pooled_heads_of_a_torchvision_teacher(torchvision_world, tmp_path, capsys):
    _, _, flags = torchvision_world
    assert run_inprocess(["--training_type", "fine_tune", *flags, "--path_to_save", tmp_path / "heads"]) == 0
    head = safe_load(tmp_path / "heads" / "head_4.pth", "head file")
    assert (head["teacher_arch"], head["head_form"], head["state_dict"]["fc.weight"].shape) == \
        ("resnet18", "avgpool 1x1", (10, 512))
    assert run_inprocess(["--training_type", "dih", *flags, "--student", "mobilenet_v1", "--saved_intermediates_directory",
                          tmp_path / "heads", "--path_to_save", tmp_path / "dih.pth"]) == 0
    reference = json.loads((tmp_path / "dih.json").read_text())["reference_test"]
    assert set(reference) == {"teacher", "head_1", "head_2", "head_3", "head_4"}
    assert "each head one linear layer on a feature map average-pooled first (avgpool 1x1" in capsys.readouterr().out


@pytest.mark.parametrize("published, arch, message", [
    ("resnet34", "resnet18", r"not hold a torchvision resnet18: key 'layer1\.2\.conv1\.weight' \(64, 64, 3, 3\) has "
                             r"no counterpart in a resnet18"),
    ("resnet18", "resnet50", r"key 'layer1\.0\.conv1\.weight' has shape \(64, 64, 3, 3\), a resnet50 needs "
                             r"\(64, 64, 1, 1\)"),
    ("mobilenet_v2", "resnet18", r"key 'features\.0\.0\.weight' \(32, 3, 3, 3\) matches none of its rules"),
    ("resnet18", "mobilenet_v2", r"key 'conv1\.weight' \(64, 3, 7, 7\) matches none of its rules"),
    ("resnet18", "resnet34", r"lacks the tensor this toolkit names 'stages\.0\.2\.conv1\.weight'"),
])
def test_a_torchvision_file_of_another_architecture_is_refused_naming_the_key(published, arch, message):
    with torch.device("meta"):
        state = getattr(torchvision.models, published)(weights=None).state_dict()
        expected = {k: v.shape for k, v in build_model(arch, 1000).state_dict().items()}
    with pytest.raises(UserError, match=message):
        from_upstream(state, arch, expected, "teacher checkpoint 'x.pth'")


def test_the_console_refuses_it_before_reading_data(tmp_path, capsys):
    torch.save(torchvision_model("resnet18", 200).state_dict(), tmp_path / "resnet18.pth")
    code = run_inprocess(["--training_type", "kd", "--teacher", "resnet50", "--saved_path", tmp_path / "resnet18.pth",
                          "--dataset", "tiny-imagenet", "--data_dir", tmp_path / "absent", "--gpu_id", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith(f"error: teacher checkpoint '{tmp_path / 'resnet18.pth'}' does not hold a torchvision "
                          "resnet50: key 'layer1.0.conv1.weight' has shape (64, 64, 3, 3)")


@pytest.mark.parametrize("arch", list(IMAGENET))
def test_mount_points_and_pooled_heads(arch):
    model = build_model(arch, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats, emb = model(x, features=True)
        for i, f in enumerate(feats):  # the deep auxiliary classifiers' path (TOFD)
            torch.testing.assert_close(model.forward_from(i, f), logits)
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 64 // s) for c, s in MOUNTS[arch]]
    assert emb.shape == (2, model.embedding_dim)
    heads = build_heads(model, 10, 64)
    # Average-pooled, then one linear layer: C * 10 weights and 10 biases each, whatever the map's size.
    assert [h.form for h in heads] == ["avgpool 1x1"] * 4
    assert [sum(p.numel() for p in h.parameters()) for h in heads] == [c * 10 + 10 for c, _ in MOUNTS[arch]]
    assert all(h(f).shape == (2, 10) for h, f in zip(heads, feats))


def test_pooled_heads_at_imagenet_scale_are_small():
    model = build_model("resnet34", 1000)
    heads = build_heads(model, 1000, 224)
    # (64 + 128 + 256 + 512) weights and 1 bias per class; flattened, head 1 alone would read 56 * 56 * 64
    # features: 200,705,000 parameters.
    assert count_parameters(heads) == 964_000
    assert [count_parameters(h) for h in build_heads(build_model("res34", 100), 100, 32)][0] == 32 * 32 * 64 * 100 + 100


def test_head_files_record_their_form_and_a_different_one_is_refused(tmp_path):
    teacher = build_model("mobilenet_v1", 10).eval()
    heads = build_heads(teacher, 10, 32)
    meta = {"teacher_arch": "mobilenet_v1", "num_classes": 10, "image_size": 32, "num_heads": 4,
            "teacher_fingerprint": "f"}
    save_heads(heads, tmp_path, meta)
    assert safe_load(tmp_path / "head_2.pth", "head file")["head_form"] == "avgpool 1x1"
    load_heads(tmp_path, teacher, meta)
    record = safe_load(tmp_path / "head_2.pth", "head file")
    atomic_save({**record, "head_form": FLATTEN}, tmp_path / "head_2.pth")
    with pytest.raises(UserError, match=r"head_2\.pth' holds a head of form 'flatten', but DIH heads on a "
                                        r"mobilenet_v1 are 'avgpool 1x1'"):
        load_heads(tmp_path, teacher, meta)


def test_a_cifar_head_file_without_a_recorded_form_is_a_flattened_one(tmp_path):
    teacher = build_model("res8", 10).eval()
    meta = {"teacher_arch": "res8", "num_classes": 10, "image_size": 32, "num_heads": 3, "teacher_fingerprint": "f"}
    save_heads(build_heads(teacher, 10, 32), tmp_path, meta)
    for path in tmp_path.glob("head_*.pth"):  # as written before head files recorded their form
        record = safe_load(path, "head file")
        assert record.pop("head_form") == FLATTEN
        atomic_save(record, path)
    assert [h.form for h in load_heads(tmp_path, teacher, meta)] == [FLATTEN] * 3


@pytest.mark.parametrize("name, small, large", [
    ("resnet18", "res18", "resnet18"), ("resnet34", "res34", "resnet34"), ("resnet50", "ResNet50", "resnet50"),
    ("ResNet50", "ResNet50", "resnet50"), ("mobilenet_v2", "MobileNetV2", "mobilenet_v2"),
    ("MobileNetV2", "MobileNetV2", "mobilenet_v2"), ("res18", "res18", "res18"), ("mobilenet_v1",) * 3,
])
def test_names_resolve_by_image_size(name, small, large):
    assert resolve_name(name, 32) == resolve_name(name, LARGE_IMAGE_PX - 1) == small
    assert resolve_name(name, LARGE_IMAGE_PX) == resolve_name(name, 224) == large
    assert resolve_name(name, None) == name


def parse(argv):
    """The console's arguments for ``argv``, its model names resolved (what the run then trains)."""
    return parse_command(build_parser(), [str(a) for a in argv], resolve_models)


def test_the_console_resolves_names_by_dataset_and_says_so_in_one_line(tmp_path, capsys):
    args = parse(["--training_type", "kd", "--teacher", "resnet34", "--student", "resnet18", "--dataset", "cifar100"])
    assert (args.teacher, args.student) == ("res34", "res18")
    assert capsys.readouterr().out == ("model names at 32 px: --teacher resnet34 is res34, --student resnet18 is "
                                       "res18 (these names mean the CIFAR layout under 64 px, torchvision's ImageNet "
                                       "layout from 64 px up; docs/IMAGENET.md#names-by-image-size)\n")
    args = parse(["--training_type", "takd", "--teacher", "ResNet50", "--ta", "resnet34", "--student", "MobileNetV2",
                  "--dataset", "tiny-imagenet"])
    assert (args.teacher, args.ta, args.student) == ("resnet50", "resnet34", "mobilenet_v2")
    out = capsys.readouterr().out
    assert out.startswith("model names at 64 px: --teacher ResNet50 is resnet50, --student MobileNetV2 is "
                          "mobilenet_v2 (") and out.count("\n") == 1
    parse(["--training_type", "kd", "--teacher", "resnet34", "--student", "mobilenet_v1", "--dataset", "tiny-imagenet"])
    assert capsys.readouterr().out == ""
    # An image folder's size is read from its first image.
    for size, name, student in ((16, "resnet18", "res18"), (64, "MobileNetV2", "mobilenet_v2")):
        folder = make_imagefolder(tmp_path / str(size), train_per_class=1, test_per_class=1, size=size, classes=2)
        args = parse(["--student", name, "--dataset", "imagefolder", "--data_dir", folder])
        assert args.student == student
        assert capsys.readouterr().out.startswith(f"model names at {size} px: --student {name} is {student} (")


def test_a_teacher_read_from_its_file_keeps_the_recorded_architecture(tmp_path):
    atomic_save({"format": FORMAT, "kind": "model", "arch": "MobileNetV2", "num_classes": 200,
                 "dataset": "tiny-imagenet", "image_size": 64, "state_dict": {}}, tmp_path / "teacher.pth")
    args = parse(["--training_type", "kd", "--saved_path", tmp_path / "teacher.pth", "--student", "MobileNetV2",
                  "--dataset", "tiny-imagenet"])
    assert (args.teacher, args.student) == ("MobileNetV2", "mobilenet_v2")


def test_the_imagenet_recipes_fill_the_published_values():
    args = parse(["--training_type", "dkd", "--recipe", "mdistiller_imagenet", "--teacher", "resnet50",
                  "--student", "mobilenet_v1", "--dataset", "tiny-imagenet"])
    assert (args.epochs, args.lr, args.schedule, args.schedule_gamma, args.batch_size, args.wd, args.momentum,
            args.nesterov) == (100, 0.2, [30, 60, 90], 0.1, 512, 1e-4, 0.9, False)
    assert (args.kd_temperature, args.dkd_warmup, args.dkd_beta, args.dkd_alpha) == (1.0, 1, 2.0, 1.0)
    kd = parse(["--training_type", "kd", "--recipe", "mdistiller_imagenet", "--teacher", "resnet34",
                "--student", "resnet18", "--dataset", "tiny-imagenet", "--epochs", "10"])
    assert (kd.ce_weight, kd.kd_weight, kd.kd_temperature, kd.schedule) == (0.5, 0.5, 1.0, [3, 6, 9])
    assert resolve(["mdistiller_imagenet"], "dkd", "resnet34", "resnet18")["dkd_beta"].value == 0.5
    # The CIFAR res34 -> res18 is another pair: it keeps DKD's default beta.
    assert "dkd_beta" not in resolve(["mdistiller_imagenet"], "dkd", "res34", "res18")
    td = resolve(["torchdistill_imagenet"], "kd", "resnet34", "resnet18")
    assert {k: v.value for k, v in td.items() if k in ("batch_size", "lr", "ce_weight", "kd_weight", "kd_temperature")} \
        == {"batch_size": 256, "lr": 0.1, "ce_weight": 0.5, "kd_weight": 0.5, "kd_temperature": 1.0}


def test_the_types_that_mount_on_stages_take_a_step_on_the_imagenet_networks():
    """FitNets, AT, TOFD and MHKD pair the four stages one by one, DIH and fine_tune mount heads, CRD embeds the
    pooled features: each trains one step of the trainer on resnet18 -> mobilenet_v1 at 64 px (other widths,
    the same strides; the logit-only types are the kd run's above)."""
    mounting = ["fine_tune", "dih", "fitnets", "at", "crd", "tofd", "mhkd"]
    opts = bench_cli.parse_args(["--teacher", "resnet18", "--student", "mobilenet_v1", "--dataset", "tiny-imagenet",
                                 "--batch_size", "4", "--device", "cpu", "--methods", *mounting,
                                 "--epoch_methods"])
    data = generated_data(opts.dataset, 4, 2)
    batches = list(dataload.train_batches(data.train, data.info, 4, CPU, torch.Generator().manual_seed(0)))
    built = variant_tasks(opts, CPU, data, batches, "", None)
    assert built["skipped"] == [] and set(mounting) < set(built["methods"])
    for name in mounting:
        built["tasks"][name]()
        grads = [p.grad for p in built["methods"][name].parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
