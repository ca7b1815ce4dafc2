"""FitNets, TAKD and AT: golden losses, short CPU runs of each training type, and their input errors."""
import json

import numpy as np
import pytest
import torch

import final_test
import train_fitnets
from KD_Loss import at_loss, attention_map, hint_loss
from dihkit.files.checkpoints import atomic_save, model_record
from models_repo import build_model
from console import TINY, data_loaded_once, run_inprocess

# TINY with fewer training images and a res8 teacher: every phase below is a few CPU seconds.
FAST = [*TINY, "--train_subset", "120", "--teacher", "res8"]


# ----------------------------------------------------------------------------- golden losses (numpy by hand)

def np_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Average pooling of (..., H, W) to (out_h, out_w) for sizes that divide evenly."""
    *lead, h, w = x.shape
    return x.reshape(*lead, out_h, h // out_h, out_w, w // out_w).mean(axis=(-3, -1))


def fixed(shape, scale=1.0, shift=0.0) -> np.ndarray:
    """A deterministic, non-trivial float64 tensor of ``shape``."""
    n = int(np.prod(shape))
    return (np.sin(np.arange(n) * 0.37 + shift) * scale + 0.1 * np.cos(np.arange(n) * 1.3)).reshape(shape)


def test_hint_loss_same_shape_is_mean_squared_error():
    s, t = fixed((2, 3, 4, 4)), fixed((2, 3, 4, 4), 1.5, 0.8)
    expected = sum((a - b) ** 2 for a, b in zip(s.ravel(), t.ravel())) / s.size
    got = hint_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hint_loss_pools_the_larger_map_to_the_smaller():
    s, t = fixed((2, 3, 8, 8)), fixed((2, 3, 4, 4), 0.7, 2.0)
    expected = ((np_pool(s, 4, 4) - t) ** 2).mean()
    got = hint_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    swapped = hint_loss(torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32))
    assert swapped.item() == pytest.approx(expected, rel=1e-5)


def np_attention(f: np.ndarray, p: float) -> np.ndarray:
    """mean over channels of |F|^p, flattened and L2-normalised per sample."""
    a = (np.abs(f) ** p).mean(axis=1)
    a = a.reshape(a.shape[0], -1)
    return a / np.sqrt((a ** 2).sum(axis=1, keepdims=True))


def test_attention_map_by_hand():
    f = fixed((2, 3, 2, 2))
    # Sample 0, position (0, 0): channels hold f[0, :, 0, 0]; the map is their mean square, then normalised.
    raw = [[sum(f[n, c, i, j] ** 2 for c in range(3)) / 3 for i in range(2) for j in range(2)] for n in range(2)]
    expected = [[v / sum(w * w for w in row) ** 0.5 for v in row] for row in raw]
    got = attention_map(torch.tensor(f, dtype=torch.float32), 2.0)
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-5)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_loss_by_hand_is_repdistillers_with_a_pooled_pair(p):
    # RepDistiller's distiller_zoo/AT.py (the DIH authors ship the same file): of a pair of sizes 8x8 and 4x4 the
    # larger FEATURE map is adaptive-average-pooled to 4x4, then each side's attention is taken; the loss is
    # beta times the sum over pairs of the mean squared difference (run_cifar_distill.sh: -b 1000).
    beta = 1000.0
    s_feats = [fixed((2, 4, 4, 4)), fixed((2, 5, 2, 2), 2.0, 1.0)]
    t_feats = [fixed((2, 6, 8, 8), 0.5, 3.0), fixed((2, 7, 2, 2), 1.0, 4.0)]
    second = ((np_attention(s_feats[1], p) - np_attention(t_feats[1], p)) ** 2).mean()
    expected = beta * (((np_attention(s_feats[0], p) - np_attention(np_pool(t_feats[0], 4, 4), p)) ** 2).mean() + second)
    got = at_loss([torch.tensor(f, dtype=torch.float32) for f in s_feats],
                  [torch.tensor(f, dtype=torch.float32) for f in t_feats], beta, p)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    # Pooling the attention map instead (the toolkit's earlier form) is another function, 1% away or more here.
    a_t = np_pool((np.abs(t_feats[0]) ** p).mean(axis=1), 4, 4).reshape(2, -1)
    a_t = a_t / np.sqrt((a_t ** 2).sum(axis=1, keepdims=True))
    attention_pooled = beta * (((np_attention(s_feats[0], p) - a_t) ** 2).mean() + second)
    assert abs(attention_pooled - expected) > 0.01 * expected


# ----------------------------------------------------------------------------- console runs

@pytest.fixture(scope="module", autouse=True)
def cached_data():
    """Generate the synthetic data once for the whole module (every run reads the same arrays)."""
    with data_loaded_once():
        yield


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A one-epoch res8 teacher on the fast recipe."""
    path = tmp_path_factory.mktemp("teacher") / "t.pth"
    assert run_inprocess(["--training_type", "ce", *FAST, "--path_to_save", path]) == 0
    return path


@pytest.fixture(scope="module")
def fitnets_run(teacher, tmp_path_factory):
    """One FitNets run (guided res8 stage 0 -> hint res8 stage 1: channels and size differ), with the
    student's initial weights captured as they were built."""
    out = tmp_path_factory.mktemp("fitnets") / "f.pth"
    initial = []

    def recording_new_model(ctx, arch):
        model = original_new_model(ctx, arch)
        initial.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    original_new_model = train_fitnets.new_model
    mp = pytest.MonkeyPatch()
    mp.setattr(train_fitnets, "new_model", recording_new_model)
    args = ["--training_type", "fitnets", *FAST, "--saved_path", teacher, "--path_to_save", out,
            "--epochs_fitnets_1", "1", "--nesterov_fitnets_1", "no", "--hint_layer", "1", "--guided_layer", "0"]
    try:
        assert run_inprocess(args) == 0
    finally:
        mp.undo()
    return out, initial[0], args


def test_fitnets_writes_both_stages(fitnets_run):
    out, _, _ = fitnets_run
    final = out.with_name("f_final.pth")
    stage1 = torch.load(out, weights_only=True)
    stage2 = torch.load(final, weights_only=True)
    assert stage1["hint_layer"] == 1 and stage1["guided_layer"] == 0 and stage1["stage"] == 1
    reg = stage1["extra_modules"]["regressor"]
    assert reg["0.weight"].shape == (32, 16, 3, 3) and "1.running_mean" in reg
    assert stage2["stage_1_model"] == str(out) and stage2["stage"] == 2
    r1 = json.loads(out.with_suffix(".json").read_text())
    r2 = json.loads(final.with_suffix(".json").read_text())
    assert r1["complete"] and r2["complete"] and r1["phase"] == "fitnets_1" and r2["phase"] == "fitnets_2"
    assert r1["meta"]["stage_2_model"] == str(final) and r2["meta"]["stage_1_result"] == str(out.with_suffix(".json"))


def test_fitnets_stage_1_leaves_the_rest_of_the_student_bit_identical(fitnets_run):
    out, initial, _ = fitnets_run
    trained = torch.load(out, weights_only=True)["state_dict"]
    untouched = [k for k in initial if not k.startswith(("stem.", "stages.0."))]
    assert any(k.startswith("stages.2.") for k in untouched) and "fc.weight" in untouched
    for k in untouched:
        assert torch.equal(trained[k], initial[k]), k
    assert not torch.equal(trained["stages.0.0.conv1.weight"], initial["stages.0.0.conv1.weight"])
    assert not torch.equal(trained["stem.1.running_mean"], initial["stem.1.running_mean"])


def test_fitnets_resume_skips_a_finished_stage_1(fitnets_run, capsys):
    out, _, args = fitnets_run
    final = out.with_name("f_final.pth")
    stage1_bytes = out.read_bytes()
    final.unlink()
    final.with_suffix(".json").unlink()
    capsys.readouterr()
    assert run_inprocess([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "[fitnets_1] already complete" in printed and "[fitnets_2] epoch 1/1" in printed
    assert final.is_file() and out.read_bytes() == stage1_bytes


def test_takd_trains_assistant_then_student_and_reuses_an_assistant(teacher, tmp_path):
    out = tmp_path / "s.pth"
    assert run_inprocess(["--training_type", "takd", *FAST, "--saved_path", teacher, "--ta", "res8",
                          "--path_to_save", out]) == 0
    ta_file = tmp_path / "s_ta_res8.pth"
    ta, student = torch.load(ta_file, weights_only=True), torch.load(out, weights_only=True)
    assert ta["arch"] == "res8" and ta["teacher"] == "res8"
    assert student["ta_model"] == str(ta_file) and student["ta_result"] == str(ta_file.with_suffix(".json"))
    assert json.loads(ta_file.with_suffix(".json").read_text())["phase"] == "takd_ta"
    assert json.loads(out.with_suffix(".json").read_text())["phase"] == "takd"

    reuse = tmp_path / "again.pth"
    assert run_inprocess(["--training_type", "takd", *FAST, "--ta", "res8", "--saved_ta_path", ta_file,
                          "--path_to_save", reuse]) == 0
    assert reuse.is_file() and not (tmp_path / "again_ta_res8.pth").exists()
    assert torch.load(reuse, weights_only=True)["ta_model"] == str(ta_file)


def test_at_runs_with_and_without_the_kd_term(teacher, tmp_path):
    out = tmp_path / "a.pth"
    assert run_inprocess(["--training_type", "at", *FAST, "--saved_path", teacher, "--path_to_save", out,
                          "--at_kd_alpha", "0.5", "--at_p", "2"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["complete"] and record["meta"]["at_beta"] == 1000.0 and record["meta"]["at_kd_alpha"] == 0.5
    assert np.isfinite(record["history"][0]["train_loss"])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra, message", [
    (["--training_type", "takd", "--ta", "res999"], "invalid choice"),
    (["--training_type", "takd", "--ta", "res20"], "larger than the teacher res8"),
    (["--training_type", "takd", "--student", "res14", "--teacher", "res110", "--ta", "res8"],
     "smaller than the student res14"),
    (["--training_type", "fitnets", "--hint_layer", "3"], "--hint_layer 3 does not exist: res8 has 3 stages"),
    (["--training_type", "fitnets", "--guided_layer", "-1"], "--guided_layer must be an integer >= 0, got -1"),
    (["--training_type", "fitnets", "--nesterov_fitnets_1", "maybe"], "expected True/False"),
    (["--training_type", "fitnets", "--epochs_fitnets_1", "2", "--schedule_fitnets_1", "3"], "--schedule_fitnets_1"),
    (["--training_type", "at", "--student", "res18"], "--teacher res8 has 3 stages and --student res18 has 4"),
    (["--training_type", "at", "--at_kd_alpha", "1.5"], "--at_kd_alpha must be a finite number >= 0 and <= 1, got 1.5"),
])
def test_bad_input_is_one_sentence_and_exit_2(extra, message, tmp_path, tmp_path_factory, capsys):
    # An untrained teacher file of the command's teacher: a missing one would be refused before the type's checks.
    argv = [*FAST, *extra]
    arch = argv[len(argv) - argv[::-1].index("--teacher")]  # the last --teacher given wins
    teacher = tmp_path_factory.mktemp("teacher") / f"{arch}.pth"
    atomic_save(model_record(build_model(arch, 10), arch, 10, "synthetic", 32), teacher)
    out = tmp_path / "x.pth"
    code = run_inprocess([*FAST, *extra, "--saved_path", teacher, "--path_to_save", out])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("text, value", [("True", True), ("yes", True), ("1", True), ("False", False),
                                         ("no", False), ("0", False)])
def test_fitnets_booleans_parse(text, value):
    assert final_test.build_parser().parse_args(["--nesterov_fitnets_1", text]).nesterov_fitnets_1 is value
