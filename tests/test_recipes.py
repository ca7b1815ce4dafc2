"""Recipes (``--recipe``), the separate CE/KD weights and the heads kept at their lowest validation loss."""
import json
import math

import pytest
import torch

import final_test
from console import data_loaded_once, run_inprocess
from dih_utils import build_heads, load_heads
from dihkit.console.recipe_flags import parse_command
from dihkit.files.checkpoints import atomic_save, model_record
from dihkit.foundations.recipes import DIH, RECIPES, resolve
from KD_Loss import cohort_loss, weighted_kd_member
from models_repo import build_model
from train_fine_tune import HeadTuning


def values(names, training_type, teacher, student, val_size=0) -> dict:
    """The recipe values for a run, without their sources."""
    return {k: r.value for k, r in resolve(names, training_type, teacher, student, val_size).items()}


def parsed(*argv):
    """The console's namespace for ``argv`` after the recipes were applied."""
    return parse_command(final_test.build_parser(), list(argv))


def test_crd_recipe_resolves_the_benchmark_protocol_and_the_small_students_lr():
    v = values(["crd"], "kd", "resnet32x4", "resnet8x4")
    assert (v["epochs"], v["lr"], v["schedule"].scaled(v["epochs"])) == (240, 0.05, [150, 180, 210])
    assert (v["batch_size"], v["wd"], v["momentum"], v["nesterov"], v["schedule_gamma"]) == (64, 5e-4, 0.9, False, 0.1)
    assert (v["ce_weight"], v["kd_weight"], v["kd_temperature"]) == (0.1, 0.9, 4.0)
    for student in ("ShuffleV1", "ShuffleV2", "MobileNetV2"):
        assert values(["crd"], "kd", "resnet32x4", student)["lr"] == 0.01
    # mdistiller's KD weights are KD's: DIST keeps its own temperature and CE.
    assert "kd_temperature" not in values(["crd"], "dist", "resnet32x4", "resnet8x4")


@pytest.mark.parametrize("teacher, student, beta", [
    ("resnet56", "resnet20", 2.0), ("res110", "res32", 2.0), ("vgg13", "vgg8", 6.0), ("wrn_40_2", "wrn_16_2", 6.0),
    ("wrn_40_2", "wrn_40_1", 6.0), ("vgg13", "MobileNetV2", 6.0), ("resnet32x4", "resnet8x4", 8.0),
    ("res110", "res20", 8.0)])
def test_dkd_beta_per_pair_with_the_toolkits_names_matched_upstream(teacher, student, beta):
    assert values(["dkd"], "dkd", teacher, student)["dkd_beta"] == beta
    assert values(["crd"], "dkd", teacher, student)["dkd_beta"] == beta
    assert "dkd_beta" not in values(["dkd"], "kd", teacher, student)


def test_ls_recipe_weights_and_the_res110_res20_entries_of_its_readme():
    v = values(["ls"], "kd", "resnet32x4", "resnet8x4")
    assert (v["ce_weight"], v["kd_weight"], v["kd_temperature"], v["logit_std"]) == (0.1, 9.0, 2.0, True)
    v = values(["ls"], "kd", "res110", "res20")
    assert (v["ce_weight"], v["kd_weight"], v["kd_temperature"]) == (0.1, 12.0, 4.0)
    assert (values(["ls"], "dkd", "res110", "res20")["dkd_alpha"], values(["ls"], "dkd", "res110", "res20")["dkd_beta"]) \
        == (15.0, 30.0)
    v = values(["ls"], "dkd", "resnet32x4", "resnet8x4")
    assert (v["dkd_alpha"], v["dkd_beta"], v["kd_temperature"]) == (9.0, 72.0, 2.0)


def test_dist_recipes():
    assert values(["dist_cifar"], "dist", "res110", "res8") == {"dist_beta": 2.0, "dist_gamma": 2.0,
                                                                 "kd_temperature": 4.0}
    assert values(["dist_imagenet"], "dist", "res110", "res8")["kd_temperature"] == 1.0


def test_the_dih_recipe_is_the_consoles_defaults():
    parser = final_test.build_parser()
    defaults = {a.dest: a.default for a in parser._actions}
    for e in DIH.entries:
        if e.dest == "schedule":
            assert e.value.scaled(200) == [60, 120, 180]
        elif not e.types:
            assert defaults[e.dest] == e.value, e.dest
    assert defaults["recipe"] == ["dih"]


def test_an_explicit_flag_beats_the_recipe_and_milestones_follow_the_epochs():
    args = parsed("--training_type", "kd", "--recipe", "crd", "--lr", "0.1", "--epochs", "8")
    # 150, 180, 210 of 240 epochs at 8 epochs: 5, 6, 7.
    assert (args.lr, args.epochs, args.schedule, args.nesterov, args.kd_weight) == (0.1, 8, [5, 6, 7], False, 0.9)
    assert "lr" not in args.recipe_values and args.recipe_values["wd"]["recipe"] == "crd"
    # --kd_alpha given: the user asked for the convex form, the recipe's CE/KD weights stay out.
    args = parsed("--training_type", "kd", "--recipe", "crd", "--kd_alpha", "0.5")
    assert (args.kd_alpha, args.ce_weight, args.kd_weight) == (0.5, None, None)
    # A later recipe replaces an earlier one's values; the one it does not name stay.
    args = parsed("--training_type", "kd", "--recipe", "crd", "ls")
    assert (args.epochs, args.kd_weight, args.logit_std) == (240, 9.0, True)


def test_contradictory_weights_and_a_selection_without_validation_are_refused(capsys):
    for argv, words in (
            (["--kd_alpha", "0.2", "--ce_weight", "1", "--kd_weight", "1"], "contradicts"),
            (["--ce_weight", "0.1"], "--kd_weight is missing"),
            (["--training_type", "fine_tune", "--head_selection", "lowest_val_loss"], "give --val_size")):
        assert run_inprocess(["--gpu_id", "cpu", *argv]) == 2
        assert words in capsys.readouterr().err


def test_head_selection_defaults_to_lowest_val_loss_with_a_validation_split():
    assert parsed("--training_type", "fine_tune", "--val_size", "100").head_selection == "lowest_val_loss"
    assert parsed("--training_type", "fine_tune").head_selection == "last"
    assert parsed("--training_type", "fine_tune", "--val_size", "100", "--head_selection", "last").head_selection \
        == "last"


def test_weighted_kd_golden_by_hand():
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    # T = 2: teacher softmax([1, 0]) = (e, 1) / (e + 1); the student's is (1/2, 1/2); CE(s, 0) = log 2.
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl = sum(q * math.log(q / 0.5) for q in p)
    member = weighted_kd_member(9.0, 0.1, 2.0)
    assert member(s, t, y).item() == pytest.approx(9.0 * 4 * kl + 0.1 * math.log(2), rel=1e-6)
    # A cohort of two: the distillation terms summed, CE counted once per member.
    t2 = torch.tensor([[0.0, 2.0]])
    kl2 = sum(q * math.log(q / 0.5) for q in reversed(p))
    assert cohort_loss(s, [t, t2], y, member).item() == pytest.approx(9.0 * 4 * (kl + kl2) + 2 * 0.1 * math.log(2),
                                                                      rel=1e-6)


def test_heads_are_kept_each_at_its_own_lowest_validation_loss(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("res8", 10)
    heads = build_heads(teacher, 10, 32)
    meta = {"teacher_arch": "res8", "num_classes": 10, "image_size": 32, "num_heads": 3}
    method = HeadTuning(teacher, heads, meta, "lowest_val_loss")
    snapshots = []
    for epoch, losses in enumerate(([3.0, 2.0, 1.0], [1.0, 5.0, 0.5], [2.0, 4.0, 0.7]), start=1):
        with torch.no_grad():
            for h in heads:
                h.fc.weight.add_(1.0)
        snapshots.append([h.fc.weight.clone() for h in heads])
        method.observe_validation(epoch, {f"head_{i}": {"loss": l} for i, l in enumerate(losses, start=1)})
    method.export(tmp_path, {"epoch": 3, "selected_on": "last epoch", "seed": 1})
    chosen = [2, 1, 2]
    for i, epoch in enumerate(chosen):
        rec = torch.load(tmp_path / f"head_{i + 1}.pth", weights_only=True)
        assert (rec["head_epoch"], rec["selected_on"]) == (epoch, "lowest validation loss, per head")
        assert torch.equal(rec["state_dict"]["fc.weight"], snapshots[epoch - 1][i])
    assert "kept.0.fc.weight" in method.state_dict()  # a resumed run continues from the kept copies


def test_recipe_values_reach_the_run_and_its_result_file(tmp_path):
    torch.manual_seed(0)
    teacher = tmp_path / "res110.pth"
    atomic_save(model_record(build_model("res110", 10), "res110", 10, "synthetic", 32), teacher)
    out = tmp_path / "kd.pth"
    with data_loaded_once(test_images=64):
        code = run_inprocess(["--training_type", "kd", "--recipe", "crd", "--teacher", "res110", "--student", "res8",
                              "--saved_path", teacher, "--dataset", "synthetic", "--train_subset", "130",
                              "--epochs", "1", "--seed", "3", "--gpu_id", "cpu", "--path_to_save", out])
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    args = record["args"]
    assert (args["lr"], args["nesterov"], args["schedule"], args["recipe"]) == (0.05, False, [1], ["crd"])
    assert (args["ce_weight"], args["kd_weight"], args["kd_temperature"]) == (0.1, 0.9, 4.0)
    assert "RepDistiller" in args["recipe_values"]["lr"]["source"] and "epochs" not in args["recipe_values"]
    assert (record["meta"]["ce_weight"], record["meta"]["kd_weight"]) == (0.1, 0.9)


def test_every_recipe_value_names_its_source():
    for recipe in RECIPES.values():
        assert all(e.source for e in recipe.entries), recipe.name


def test_recipes_page_is_generated_from_the_tables(tmp_path):
    import importlib.util
    from console import ROOT
    spec = importlib.util.spec_from_file_location("gen_recipes", ROOT / "scripts" / "gen_recipes.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0, "docs/RECIPES.md is stale: run python3 scripts/gen_recipes.py"
    stale = tmp_path / "RECIPES.md"
    stale.write_text("old")
    assert gen.main(["--check"], path=stale) == 1
    assert gen.main([], path=stale) == 0 and gen.main(["--check"], path=stale) == 0
    assert "HobbitLong/RepDistiller train_student.py" in stale.read_text()


def test_a_pipeline_passes_a_flag_given_at_its_default_so_that_it_beats_the_steps_recipe():
    from dihkit.results.pipeline import passthrough
    parser = final_test.build_parser()
    args = parse_command(parser, ["--training_type", "pipeline", "--recipe", "crd", "--lr", "0.1"])
    flags = passthrough(args, parser)
    assert flags["lr"] == ["--lr", "0.1"] and flags["recipe"] == ["--recipe", "crd"]
    assert "epochs" not in flags and args.epochs == 200  # the pipeline itself applies no recipe: its steps do
