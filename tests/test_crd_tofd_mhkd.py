"""CRD, TOFD and MHKD: their losses by hand, stage-by-stage pairing, a frozen teacher, and both ways to run them."""
import copy
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import CRD.crd
import final_test
import MHKD.mhkd
from dihkit.methods import feature_baselines
import TOFD.tofd
from dihkit.files.checkpoints import atomic_save, model_record
from console import TINY, data_loaded_once, make_ctx, run_inprocess, run_subprocess
from CRD.crd import CRDMethod, nce_loss
from dih_utils import Cohort

from MHKD.mhkd import MHKDMethod, build_multi_heads
from models_repo import build_model
from dihkit.foundations.registry import REGISTRY

# The example command lines of the README, minus what only a GPU run on CIFAR-100 needs.
EXAMPLE = ["--student", "res8", "--teacher", "res110", "--saved_path", "runs/teacher.pth", "--path_to_save",
           "runs/res8_crd.pth", "--batch_size", "128", "--dataset", "cifar100", "--epochs", "200", "--gpu_id",
           "cuda:0", "--lr", "0.1", "--schedule", "60", "120", "180", "--wd", "0.0005", "--alpha", "0.1", "--beta",
           "0.03", "--temperature", "5"]
# TINY with fewer training samples: these runs check wiring and outputs, not learning.
FAST = [*TINY, "--train_subset", "100"]
SCRIPTS = {"crd": "CRD/train_student.py", "tofd": "TOFD/tofd_train.py", "mhkd": "MHKD/mhkd_training.py"}


@pytest.fixture(scope="module", autouse=True)
def small_test_split():
    """In-process runs generate the data once and evaluate on 200 of its 1000 test images; the subprocess
    runs (scripts) still use the whole split."""
    with data_loaded_once(200):
        yield


# ----------------------------------------------------------------------------- golden losses

def test_nce_loss_by_hand():
    probs = [[0.5, 0.1, 0.2, 0.05], [2.0, 0.05, 0.3, 1.0]]
    noise = 1 / 20
    m = 3 * noise
    expected = 0.0
    for row in probs:
        expected -= math.log(row[0] / (row[0] + m + 1e-7))
        for p in row[1:]:
            expected -= math.log(m / (p + m + 1e-7))
    expected /= len(probs)
    assert nce_loss(torch.tensor(probs, dtype=torch.float64), noise).item() == pytest.approx(expected, rel=1e-12)


def crd_method(labels, feat_dim=2, nce_k=2, nce_t=0.5, nce_m=0.5):
    """A CRDMethod on small models; only its memory, sampler and contrast are exercised."""
    return CRDMethod(build_model("res8", 3), build_model("res8", 3), {}, torch.tensor(labels), feat_dim, nce_k, nce_t,
                     nce_m, 0.1, 0.8, 4.0, torch.Generator().manual_seed(0))


def test_contrast_normalises_by_z_estimated_once_from_the_first_batch():
    method = crd_method([0, 0, 1, 1, 2, 2])
    bank = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0], [0.8, -0.6]]
    index = [[0, 2, 3], [1, 4, 5]]

    def scores(v):  # exp(v . bank[j] / 0.5) for every (sample, contrast index), flattened
        return [math.exp(sum(a * b for a, b in zip(v[i], bank[j])) / 0.5) for i in range(2) for j in index[i]]

    first, second = [[0.3, 0.7], [-0.5, 0.2]], [[0.9, -0.1], [0.1, 0.1]]
    z = sum(scores(first)) / 6 * 6  # the mean of the 2 x 3 scores, times N = 6 training samples
    for v in (first, second):  # the second batch is still divided by the first batch's Z
        out = method.contrast(torch.tensor(v), torch.tensor(bank), torch.tensor(index), method.z_s)
        assert out.flatten().tolist() == pytest.approx([p / z for p in scores(v)], rel=1e-5)
        assert method.z_s.item() == pytest.approx(z, rel=1e-6)


def test_negatives_come_from_other_classes_and_cover_them():
    labels = [0, 1, 1, 2, 2, 2, 0, 1]
    method = crd_method(labels, nce_k=4000)
    y = torch.tensor([0, 1, 2])
    neg = method.draw_negatives(y)
    assert neg.shape == (3, 4000)
    for row, cls in zip(neg.tolist(), y.tolist()):
        assert set(row) == {i for i, c in enumerate(labels) if c != cls}
    # The sampler's random state is part of the method's state: a resumed run draws the same negatives.
    state = copy.deepcopy(method.state_dict())
    drawn = method.draw_negatives(y)
    method.load_state_dict(state)
    assert torch.equal(method.draw_negatives(y), drawn)


def test_memory_update_is_a_normalised_momentum_average():
    method = crd_method([0, 1, 2, 0], nce_m=0.25)
    old_s, old_t = method.memory_s.clone(), method.memory_t.clone()
    v_s, v_t = torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    method.update_memory(torch.tensor([3, 1]), v_s, v_t)
    for bank, old, v in ((method.memory_s, old_s, v_s), (method.memory_t, old_t, v_t)):
        for row, i in enumerate([3, 1]):
            mixed = [0.25 * o + 0.75 * n for o, n in zip(old[i].tolist(), v[row].tolist())]
            norm = math.sqrt(sum(c * c for c in mixed))
            assert bank[i].tolist() == pytest.approx([c / norm for c in mixed], rel=1e-6)
        assert torch.equal(bank[[0, 2]], old[[0, 2]])
    keys = set(method.state_dict())
    assert {"memory_s", "memory_t", "z_s", "z_t", "_extra_state"} <= keys


def test_mhkd_pairs_each_student_head_with_the_teachers_at_the_same_stage():
    torch.manual_seed(0)
    teacher = build_model("res8", 10)
    cohort = Cohort(teacher, build_multi_heads(teacher, 10, 32))
    method = MHKDMethod(copy.deepcopy(teacher), copy.deepcopy(cohort.heads), {}, cohort, weights=(0.3, 0.7), beta=1.0,
                        temperature=4.0).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    with torch.no_grad():
        loss, _ = method(x, y, torch.arange(6))
        outs = cohort(x)
        expected = 0.7 * F.cross_entropy(outs[0], y) + sum(F.cross_entropy(l, y) for l in outs[1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(not torch.allclose(outs[i], outs[j]) for i in range(1, 4) for j in range(1, i))


# ----------------------------------------------------------------------------- end to end

def snapshot(modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method trained by the console in-process while its frozen models are watched.

    The teacher is an untrained res14 written as a model file: what it predicts does not matter here.
    """
    out = tmp_path_factory.mktemp("feature_baselines")
    torch.manual_seed(0)
    atomic_save(model_record(build_model("res14", 10), "res14", 10, "synthetic", 32, epoch=0), out / "teacher.pth")
    watched = []

    def watching(real):
        def run_phase(method, ctx, paths, cfg, phase, meta, finished):
            frozen = [method.cohort.teacher, *method.cohort.heads]
            before = snapshot(frozen)
            record = real(method, ctx, paths, cfg, phase, meta, finished)
            for m, saved in zip(frozen, before):
                assert all(torch.equal(v, m.state_dict()[k]) for k, v in saved.items()), phase
                assert not any(x.training for x in m.modules()), phase
            watched.append((phase, len(frozen)))
            return record
        return run_phase

    with pytest.MonkeyPatch.context() as mp:
        for module in (CRD.crd, TOFD.tofd, MHKD.mhkd, feature_baselines):
            mp.setattr(module, "run_phase", watching(module.run_phase))
        for kind in SCRIPTS:
            code = run_inprocess([*FAST, "--training_type", kind, "--saved_path", out / "teacher.pth",
                                  "--path_to_save", out / f"{kind}.pth", "--alpha", "0.1", "--temperature", "5"])
            assert code == 0, kind
    assert watched == [("crd", 1), ("tofd_teacher", 1), ("tofd", 3), ("mhkd_teacher", 1), ("mhkd", 4)]
    return out


def test_each_console_type_trains_and_exports_a_plain_student(runs):
    extras = {"crd": {"embed_s", "embed_t"}, "tofd": {"aux", "links"}, "mhkd": {"heads"}}
    plain = set(build_model("res8", 10).state_dict())
    for kind, names in extras.items():
        record = json.loads((runs / f"{kind}.json").read_text())
        assert record["complete"] and record["training_type"] == kind and record["phase"] == kind
        saved = torch.load(runs / f"{kind}.pth", weights_only=True)
        assert saved["arch"] == "res8" and set(saved["state_dict"]) == plain
        assert set(saved["extra_modules"]) == names
        assert saved["beta"] == REGISTRY[kind].flag_defaults["beta"]
    for kind, k in (("tofd", 2), ("mhkd", 3)):
        heads = runs / f"{kind}_{kind}_teacher_aux"
        assert sorted(p.name for p in heads.glob("head_*.pth")) == [f"head_{i}.pth" for i in range(1, k + 1)]
        assert json.loads((heads / "result.json").read_text())["phase"] == f"{kind}_teacher"
    crd = torch.load(runs / "crd.pth", weights_only=True)
    assert crd["nce_k"] == 90  # 100 samples, 10 per class: capped at the samples of other classes


def run_script(runs, kind: str, script: str) -> None:
    """One per-method script on the module's teacher (reusing its tuned heads), checked."""
    reuse = [f"--saved_{kind}_directory", runs / f"{kind}_{kind}_teacher_aux"] if kind != "crd" else []
    result = run_subprocess([*FAST, "--saved_path", runs / "teacher.pth", "--path_to_save", runs / f"s_{kind}.pth",
                             "--alpha", "0.1", "--beta", "0.03", "--temperature", "5", *reuse], cwd=runs, script=script)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((runs / f"s_{kind}.json").read_text())
    assert record["training_type"] == kind and record["meta"]["beta"] == 0.03
    if kind == "crd":
        assert "[crd] memory banks: 2 x 100 samples x 128 float32" in result.stdout
    else:
        assert "reusing the teacher's" in result.stdout and f"[{kind}_teacher]" not in result.stdout


def test_scripts_run_the_same_methods_and_reuse_the_teachers_heads(runs):
    # Independent processes, two at a time (one per core).
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(run_script, runs, kind, script) for kind, script in SCRIPTS.items()]:
            done.result()


def test_beta_has_a_default_per_method():
    for kind, default in (("crd", 0.8), ("tofd", 0.03), ("mhkd", 1.0)):
        assert make_ctx(["--training_type", kind]).cfg.method.beta == default
        assert make_ctx(["--training_type", kind, "--beta", "0.5"]).cfg.method.beta == 0.5


def test_example_command_lines_parse():
    for kind in SCRIPTS:
        args = final_test.build_parser().parse_args(["--training_type", kind, *EXAMPLE])
        assert (args.kd_alpha, args.beta, args.kd_temperature, args.batch_size) == (0.1, 0.03, 5.0, 128)
        assert args.schedule == [60, 120, 180] and args.wd == 0.0005


# ----------------------------------------------------------------------------- bad input

def test_script_refuses_another_training_type(capsys):
    code = final_test.main_as("crd", [*TINY, "--training_type", "kd"], prog="CRD/train_student.py")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "trains --training_type crd, not kd" in err


@pytest.mark.parametrize("kind, flags, message", [
    ("crd", ["--nce_k", "0"], "--nce_k must be an integer >= 1"),
    ("crd", ["--feat_dim", "-1"], "--feat_dim must be an integer >= 1"),
    ("crd", ["--nce_m", "1"], "--nce_m must be a finite number >= 0 and < 1"),
    ("crd", ["--nce_t", "0"], "--nce_t must be a finite number > 0"),
    ("tofd", ["--beta", "-0.1"], "--beta must be a finite number >= 0"),
    ("mhkd", ["--teacher", "res18"], "res18 has 4 stages and --student res8 has 3"),
    ("crd", [], "does not exist"),
    ("tofd", ["--saved_tofd_directory", "nowhere"], "heads directory 'nowhere' does not exist"),
])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, kind, flags, message):
    teacher = tmp_path / "missing.pth"
    if flags:  # a file of the command's teacher, so that the flag is what the command is refused for
        arch = flags[flags.index("--teacher") + 1] if "--teacher" in flags else "res14"
        teacher = tmp_path / "t.pth"
        atomic_save(model_record(build_model(arch, 10), arch, 10, "synthetic", 32), teacher)
    code = run_inprocess([*FAST, "--training_type", kind, "--saved_path", teacher, "--path_to_save",
                          tmp_path / "s.pth", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    assert not (tmp_path / "s.pth").exists()
