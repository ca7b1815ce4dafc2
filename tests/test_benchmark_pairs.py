"""The benchmark's teacher/student pairs run end to end: one short epoch of ce (the teacher), fine_tune (its
heads), kd and dih (the student) each, on tiny generated CIFAR-100 files: one batch of 50 training images, 10
tested."""
import os

import pytest
import torch
import torchvision.datasets.cifar

from console import data_loaded_once, run_inprocess
from dihkit.files.checkpoints import safe_load
import test_seed_commands

# RepDistiller's and mdistiller's CIFAR-100 pairs (docs/BENCHMARK.md); the first runs by default, the
# others as slow tests (CI runs them).
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
         ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
         ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]
DEFAULT = {("resnet56", "resnet20")}


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    """A folder holding generated CIFAR-100 batches, read without torchvision's checksums."""
    folder = tmp_path_factory.mktemp("cifar100")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_seed_commands, "TRAIN_IMAGES", 50)  # one batch: the pairs' models are large
        test_seed_commands.write_tiny_cifar100(folder)
        mp.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
        with data_loaded_once(test_images=10):
            yield folder


@pytest.mark.parametrize("teacher, student", [p if p in DEFAULT else pytest.param(*p, marks=pytest.mark.slow)
                                              for p in PAIRS])
def test_a_benchmark_pair_trains_its_teacher_heads_and_students(teacher, student, cifar100, tmp_path):
    common = ["--dataset", "cifar100", "--data_dir", cifar100, "--epochs", "1", "--schedule", "1", "--seed", "3",
              "--gpu_id", "cpu", "--batch_size", "50", "--teacher", teacher, "--student", student]
    t, heads = tmp_path / "teacher.pth", tmp_path / "heads"
    assert run_inprocess([*common, "--training_type", "ce", "--path_to_save", t]) == 0
    assert run_inprocess([*common, "--training_type", "fine_tune", "--saved_path", t, "--path_to_save", heads]) == 0
    for method in ("kd", "dih"):
        assert run_inprocess([*common, "--training_type", method, "--saved_path", t, "--saved_intermediates_directory",
                              heads, "--path_to_save", tmp_path / f"{method}.pth"]) == 0
        record = safe_load(tmp_path / f"{method}.pth", "student")
        assert (record["arch"], record["num_classes"]) == (student, 100)
        assert all(bool(torch.isfinite(v).all()) for v in record["state_dict"].values() if v.is_floating_point())
    assert safe_load(t, "teacher")["arch"] == teacher
    assert len(list(heads.glob("head_*.pth"))) == build_k(teacher)


def build_k(arch: str) -> int:
    """The number of mount points (heads) of ``arch``."""
    from models_repo import build_model
    with torch.device("meta"):
        return build_model(arch, 100).num_stages
