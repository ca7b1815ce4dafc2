"""The runs the papers ran, pinned to their upstream lines: logit standardisation's 28 published KD/DKD runs,
RepDistiller's CRD, AT and one-stage FitNet under ``--recipe crd``, the DIH authors' tuned code (``dih_code``,
reflect-padded crops), and each recipe's normalisation constants.

Every expected value below is typed from the upstream source named beside it (REFERENCE.md section 6c), never
computed from the toolkit's tables, so a wrong table entry fails.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import dataload
import final_test
from console import TINY, data_loaded_once, run_inprocess
from CRD.crd import crd_label
from dihkit.console.recipe_flags import parse_command
from dihkit.files.checkpoints import atomic_save, model_record
from dihkit.foundations.errors import UserError
from dihkit.runs.distributed import Dist
from dihkit.sources.data_types import DatasetInfo, Split
from models_repo import build_model
from train_dkd import dkd_objective
from train_fitnets import OneStageFitNet, repdistiller_regressor
from train_kd import kd_objective


def parsed(*argv):
    """The console's namespace for ``argv`` after the recipes were applied."""
    return parse_command(final_test.build_parser(), [str(a) for a in argv])


def settings(*argv):
    """The typed settings the console builds for ``argv`` (recipes applied, defaults resolved)."""
    return final_test.make_settings(parsed(*argv))


# ----------------------------------------------------------------------------- logit standardisation, per pair

# sunshangquan/logit-standardization-KD README.md links one log per run, named KD_TYPE,TEACHER,STUDENT,
# BASE_TEMPERATURE,KD_WEIGHT[,BETA]. tools/train.py: KD.TEMPERATURE = base temperature, KD.LOSS.KD_WEIGHT = weight
# (KD.LOSS.CE_WEIGHT stays cfg.py's 0.1); DKD.T = base temperature, DKD.ALPHA = 1.0 x weight, DKD.BETA = (the
# name's BETA, else the pair's config beta: mdistiller's 8, or 6 / 2 for the pairs its configs list) x weight,
# DKD.CE_WEIGHT stays 1.0. Columns: KD (T, KD weight) from the kd log, DKD (T, alpha, beta) from the dkd log.
LS_PUBLISHED = [
    ("resnet32x4", "resnet8x4", (2, 9), (2, 9, 72)),      # kd,...,2,9        dkd,...,2,9 (config beta 8)
    ("vgg13", "vgg8", (3, 9), (2, 15, 30)),               # kd,...,3,9        dkd,...,2,15,2.0
    ("wrn_40_2", "wrn_40_1", (2, 9), (2, 12, 24)),        # kd,...,2,9        dkd,...,2,12,2.0
    ("wrn_40_2", "wrn_16_2", (2, 9), (2, 12, 24)),        # kd,...,2,9        dkd,...,2,12,2.0
    ("resnet56", "resnet20", (2, 9), (3, 18, 36)),        # kd,...,2,9        dkd,...,3,18,2.0
    ("resnet110", "resnet32", (2, 9), (2, 15, 30)),       # kd,...,2,9        dkd,...,2,15,2.0
    ("resnet110", "resnet20", (4, 12), (2, 15, 30)),      # kd,...,4,12       dkd,...,2,15,2.0
    ("resnet32x4", "ShuffleV2", (2, 9), (2, 9, 72)),      # kd,...,2,9        dkd,...,2,9 (config beta 8)
    ("resnet32x4", "wrn_16_2", (3, 9), (2, 9, 18)),       # kd,...,3,9        dkd,...,2,9,2.0
    ("resnet32x4", "wrn_40_2", (3, 9), (2, 9, 72)),       # kd,...,3,9        dkd,...,2,9,8.0
    ("wrn_40_2", "resnet8x4", (2, 9), (2, 18, 36)),       # kd,...,2,9        dkd,...,2,18,2.0
    ("wrn_40_2", "MobileNetV2", (3, 9), (2, 15, 30)),     # kd,...,3,9        dkd,...,2,15,2.0
    ("vgg13", "MobileNetV2", (3, 9), (3, 9, 18)),         # kd,...,3,9        dkd,...,3,9,2.0
    ("ResNet50", "MobileNetV2", (3, 1), (2, 15, 30)),     # kd,...,3,1        dkd,...,2,15,2.0
]


@pytest.mark.parametrize("teacher, student, kd, dkd", LS_PUBLISHED, ids=[f"{t}-{s}" for t, s, _, _ in LS_PUBLISHED])
def test_ls_recipe_resolves_both_published_runs_of_the_pair_exactly(teacher, student, kd, dkd):
    pair = ("--recipe", "crd", "ls", "--teacher", teacher, "--student", student)
    cfg = settings("--training_type", "kd", *pair)
    member = kd_objective(cfg.models, cfg.method.logit_std).member
    assert (member.distill.keywords, member.distill_weight, member.ce_weight) == (
        {"temperature": kd[0], "logit_std": True}, kd[1], 0.1)
    cfg = settings("--training_type", "dkd", *pair)
    member = dkd_objective(cfg.models, cfg.method).member
    assert member.distill.keywords == {"alpha": dkd[1], "beta": dkd[2], "temperature": dkd[0], "logit_std": True}
    assert (member.distill_weight, member.ce_weight, cfg.method.dkd_warmup) == (1.0, 1.0, 20)


def test_ls_recipe_keeps_train_pys_defaults_for_an_unpublished_pair():
    cfg = settings("--training_type", "kd", "--recipe", "ls", "--teacher", "res110", "--student", "res8")
    assert (cfg.models.kd_temperature, cfg.models.kd_weight, cfg.models.ce_weight) == (2.0, 9.0, 0.1)
    cfg = settings("--training_type", "dkd", "--recipe", "ls", "--teacher", "res110", "--student", "res8")
    assert (cfg.models.kd_temperature, cfg.method.dkd_alpha, cfg.method.dkd_beta) == (2.0, 9.0, 72.0)


# ----------------------------------------------------------------------------- RepDistiller's runs under crd

def test_crd_recipe_trains_ce_plus_crd_and_kd_alpha_1_gives_crd_plus_kd():
    # scripts/run_cifar_distill.sh: CRD "-a 0 -b 0.8", CRD+KD "-a 1 -b 0.8"; train_student.py --kd_T 4.
    crd = settings("--training_type", "crd", "--recipe", "crd")
    assert (crd.models.kd_alpha, crd.method.beta, crd.models.kd_temperature) == (0.0, 0.8, 4.0)
    assert crd_label(crd.flags) == "CRD"
    both = settings("--training_type", "crd", "--recipe", "crd", "--kd_alpha", "1")
    assert (both.models.kd_alpha, both.method.beta, both.models.kd_temperature) == (1.0, 0.8, 4.0)
    assert crd_label(both.flags) == "CRD+KD (alpha 1)"
    seed = settings("--training_type", "crd")  # the seed's form stays the default
    assert (seed.models.kd_alpha, seed.method.beta, seed.models.kd_temperature) == (0.1, 0.8, 5.0)


def test_crd_recipe_runs_at_and_fitnets_as_repdistiller():
    # run_cifar_distill.sh: AT "--distill attention -a 0 -b 1000"; FitNet "--distill hint -a 0 -b 100", one stage,
    # train_student.py --hint_layer 2: feat[2], the output of the second stage of teacher and student.
    at = settings("--training_type", "at", "--recipe", "crd")
    assert (at.method.at_beta, at.method.at_kd_alpha) == (1000.0, 0.0)
    fitnet = settings("--training_type", "fitnets", "--recipe", "crd")
    s = fitnet.method
    assert (s.fitnets_stages, s.hint_weight, s.hint_layer, s.guided_layer) == (1, 100.0, 1, 1)
    assert settings("--training_type", "fitnets").method.fitnets_stages == 2  # the seed's two stages by default


@pytest.mark.parametrize("student, teacher, layer", [
    ((128, 16, 16), (256, 8, 8), torch.nn.Conv2d),           # twice as large: 3x3, stride 2
    ((64, 8, 8), (128, 16, 16), torch.nn.ConvTranspose2d),   # half as large: 4x4 transposed, stride 2
    ((64, 8, 8), (32, 8, 8), torch.nn.Conv2d),               # the same size: 1x1
    ((64, 6, 6), (32, 4, 4), torch.nn.Conv2d),               # otherwise larger: a 3x3 kernel spans the difference
])
def test_repdistillers_convreg_maps_the_student_map_onto_the_teachers(student, teacher, layer):
    # RepDistiller models/util.py ConvReg: the convolution by size ratio, then BatchNorm2d and ReLU.
    reg = repdistiller_regressor(student, teacher)
    assert [type(m) for m in reg] == [layer, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert reg(torch.randn(2, *student)).shape == (2, *teacher)


def test_repdistillers_convreg_refuses_what_it_does_not_implement():
    with pytest.raises(UserError, match="larger or half as large"):
        repdistiller_regressor((64, 4, 4), (64, 16, 16))


def test_one_stage_fitnet_loss_by_hand():
    torch.manual_seed(0)
    student, teacher = build_model("res8", 10), build_model("res14", 10).eval()
    reg = repdistiller_regressor((32, 16, 16), (32, 16, 16))
    method = OneStageFitNet(student, {}, teacher, reg, 1, 1, 100.0).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, logits = method(x, y, torch.arange(4))
    # By hand, on the same modules: CE of the student's logits + 100 x mean squared error of the regressed second
    # stage against the teacher's second stage (train_student.py: loss = gamma * CE + beta * HintLoss, gamma 1).
    with torch.no_grad():
        t = teacher.stem(x)
        for stage in teacher.stages[:2]:
            t = stage(t)
    s = student.stem(x)
    for stage in student.stages[:2]:
        s = stage(s)
    expected = F.cross_entropy(logits, y) + 100.0 * ((reg(s) - t) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_stage_fitnet_writes_one_final_phase_that_the_report_counts(tmp_path):
    import json

    import report
    teacher = tmp_path / "t.pth"
    atomic_save(model_record(build_model("res8", 10), "res8", 10, "synthetic", 32), teacher)
    out = tmp_path / "runs" / "f.pth"
    with data_loaded_once(test_images=64):
        assert run_inprocess(["--training_type", "fitnets", *TINY, "--train_subset", "120", "--teacher", "res8",
                              "--saved_path", teacher, "--fitnets_stages", "1", "--path_to_save", out]) == 0
    assert not out.exists() and (tmp_path / "runs" / "f_final.pth").is_file()
    record = json.loads((tmp_path / "runs" / "f_final.json").read_text())
    assert record["phase"] == "fitnets" and record["meta"]["hint_weight"] == 100.0
    text = report.write_report([tmp_path / "runs"], tmp_path / "report")
    assert "| FitNet (one stage, hint 100) |" in text


# ----------------------------------------------------------------------------- the DIH authors' tuned code

def test_dih_code_recipe_is_the_authors_code_after_hyperparameters_tuning():
    # final_test.py argparse after commit "Hyperparameters tuning": --epochs 240, --batch_size 128, --lr 0.05,
    # --schedule 150 180 210, --schedule_gamma 0.2, --wd 5e-4, --momentum 0.9, nesterov on; dataload.py:
    # RandomCrop(32, padding=4, padding_mode='reflect'); its ce branch: milestones=[60, 120, 180].
    args = parsed("--training_type", "dih", "--recipe", "dih_code")
    assert (args.epochs, args.batch_size, args.lr, args.schedule, args.schedule_gamma) == (240, 128, 0.05,
                                                                                            [150, 180, 210], 0.2)
    assert (args.wd, args.momentum, args.nesterov, args.crop_padding, args.normalization) == (5e-4, 0.9, True,
                                                                                             "reflect", "dih")
    assert parsed("--training_type", "ce", "--recipe", "dih_code").schedule == [60, 120, 180]
    # --schedule_fitnets_1 60 120 180 lies past stage 1's 40 epochs there: a constant lr (the flag without a value).
    assert parsed("--training_type", "fitnets", "--recipe", "dih_code").schedule_fitnets_1 == []
    readme = parsed("--training_type", "dih")  # the README's values stay the default recipe
    assert (readme.epochs, readme.batch_size, readme.lr, readme.crop_padding) == (200, 64, 0.1, "zeros")


def torchvision_crop(image: torch.Tensor, top: int, left: int, flip: bool, mode: str) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding=4, padding_mode=mode) + flip + ToTensor for fixed parameters."""
    picture = TF.crop(TF.pad(Image.fromarray(image.permute(1, 2, 0).numpy()), 4, padding_mode=mode), top, left, 32, 32)
    return TF.to_tensor(TF.hflip(picture) if flip else picture)


def test_reflect_padding_matches_torchvisions_reflect_crop():
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    offsets, flips = torch.tensor([[0, 0], [8, 8], [0, 8], [3, 5]]), torch.tensor([True, False, False, True])
    got = dataload.augment_batch(images, offsets, flips, (0, 0, 0), (1, 1, 1), "reflect")
    zeros = dataload.augment_batch(images, offsets, flips, (0, 0, 0), (1, 1, 1), "zeros")
    for b in range(4):
        top, left = offsets[b].tolist()
        expected = torchvision_crop(images[b], top, left, bool(flips[b]), "reflect")
        torch.testing.assert_close(got[b], expected, atol=1e-6, rtol=0)
    # At the corner crop the border is the image's mirror, not zeros: the two paddings differ there.
    assert got[0, :, :4, :4].ne(0).any() and zeros[0, :, :4, 28:].eq(0).all()


def test_the_loader_path_pads_by_reflection_too():
    split = Split(torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8),
                  torch.arange(6) % 2)
    info = DatasetInfo("test", 2, 32, (0, 0, 0), (1, 1, 1), ("a", "b"))
    loaded = next(dataload.train_batches(split, info, 6, "cpu", torch.Generator().manual_seed(2), "loader",
                                         padding="reflect"))
    grid = torch.cartesian_prod(torch.arange(9), torch.arange(9), torch.arange(2))
    for x, i in zip(loaded[0], loaded[2]):
        copies = split.images[i].expand(len(grid), -1, -1, -1)
        candidates = dataload.augment_batch(copies, grid[:, :2], grid[:, 2].bool(), (0, 0, 0), (1, 1, 1), "reflect")
        assert (candidates - x).abs().amax((1, 2, 3)).min() < 1e-6


def test_crop_padding_reaches_the_training_batches(tmp_path, monkeypatch):
    seen = []
    real = dataload.train_batches

    def recording(*args, **kwargs):
        seen.append(args[9] if len(args) > 9 else kwargs.get("padding"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dataload, "train_batches", recording)
    with data_loaded_once(test_images=64):
        assert run_inprocess(["--training_type", "ce", *TINY, "--train_subset", "100", "--teacher", "res8",
                              "--recipe", "dih_code", "--epochs", "1", "--batch_size", "64",
                              "--path_to_save", tmp_path / "t.pth"]) == 0
    assert seen == ["reflect"]


# ----------------------------------------------------------------------------- normalisation per recipe

CIFAR100 = DatasetInfo("cifar100", 100, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ())


@pytest.mark.parametrize("recipe, mean, std", [
    # the DIH authors' dataload.py, get_cifar (cifar100)
    ("dih", (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    ("dih_code", (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    # RepDistiller dataset/cifar100.py and mdistiller mdistiller/dataset/cifar100.py
    ("crd", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
])
def test_each_recipe_normalises_cifar100_with_its_sources_constants(recipe, mean, std):
    cfg = settings("--training_type", "kd", "--recipe", recipe)
    info = dataload.normalized(CIFAR100, cfg.data.normalization)
    assert (info.mean, info.std) == (mean, std)


def test_a_dataset_a_table_lacks_keeps_its_own_constants():
    # RepDistiller publishes CIFAR-100 constants only; the DIH authors' CIFAR-10 ones are (0.4914, ...) / (0.247, ...).
    cifar10 = DatasetInfo("cifar10", 10, 32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), ())
    assert dataload.normalized(cifar10, "repdistiller") == cifar10
    assert dataload.normalized(cifar10, "dih").std == (0.247, 0.243, 0.261)
    assert dataload.normalized(CIFAR100, "dataset") == CIFAR100


def test_the_run_normalises_with_its_recipes_constants(monkeypatch):
    loaded = dataload.DataBundle(CIFAR100, Split(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1)),
                                 None, Split(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1)))
    monkeypatch.setattr(dataload, "load_data", lambda *a, **k: loaded)
    for recipe, mean in (("crd", (0.5071, 0.4867, 0.4408)), ("dih", (0.507, 0.487, 0.441))):
        data = final_test.load_data(settings("--training_type", "kd", "--recipe", recipe), None, Dist())
        assert data.info.mean == mean and math.isclose(data.info.std[0], {"crd": 0.2675, "dih": 0.267}[recipe])
