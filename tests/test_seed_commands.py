"""The method's first commands, word for word, run as subprocesses of the real scripts on a tiny CIFAR-100.

The commands are those of the method's original README (teacher, heads, KD, DIH, FitNets, CRD, TOFD and
MHKD, whose README wrote ``python3 train_mhkd.py``). Each runs from a temporary folder that plays the
repository root (the MHKD one also from its ``MHKD`` folder, and from the root as ``MHKD/train_mhkd.py``),
with the command's own relative paths (``runs/...``, ``./data``). After the command's own flags, and only to
make the run small, these are appended (the last value of a flag wins):

- ``--gpu_id cpu`` (the commands say ``cuda:0``): the tests run without a GPU;
- ``--epochs 1 --schedule 1`` (the commands say 200 epochs, milestones ``60 120 180``, which would lie
  beyond one epoch); the FitNets command also ``--epochs_fitnets_1 1`` (it says 40);
- ``--data_dir ../data`` for the command run inside ``MHKD/`` only: the data lies in the root's ``data/``.

Nothing else changes: the models are the commands' own (res110 teacher, res8 student), and the CRD, TOFD
and MHKD commands, which give no ``--seed``, run the default three seeds. The data is a CIFAR-100 of 100
training and 50 test images of random pixels, written in the official on-disk format (the
``cifar-100-python`` folder of pickled batches) into ``data/``. Those files cannot carry the official MD5
checksums torchvision compares, so the subprocesses start with a ``sitecustomize`` that replaces only that
comparison (the files must still exist); the data is then read by torchvision's own CIFAR100 class, as on
a real machine.
"""
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from console import ROOT
from dihkit.console.console_flags import build_parser
from test_dataload import dump_py2

TRAIN_IMAGES, TEST_IMAGES = 100, 50     # one training image per class
RECIPE = ("--batch_size 64 --dataset cifar100 --epochs 200 --gpu_id cuda:0 --lr 0.1 --schedule 60 120 180 "
          "--wd 0.0005")
FEATURE_FLAGS = ("--student res8 --teacher res110 --saved_path runs/teacher.pth --path_to_save {out} --batch_size 128 "
                 "--dataset cifar100 --epochs 200 --gpu_id cuda:0 --lr 0.1 --schedule 60 120 180 --wd 0.0005 "
                 "--alpha 0.1 --beta 0.03 --temperature 5")
SHRINK = ["--gpu_id", "cpu", "--epochs", "1", "--schedule", "1"]
SEEDS = (30, 50, 67)
# (folder it is typed in, command, flags appended beyond SHRINK, training type, result files it writes)
COMMANDS = [
    (".", f"python3 final_test.py --training_type ce --teacher res110 --path_to_save runs/teacher.pth {RECIPE} "
          "--seed 3", [], "ce", ["runs/teacher.json"]),
    (".", "python3 final_test.py --training_type fine_tune --teacher res110 --saved_path runs/teacher.pth "
          f"--path_to_save runs/headers {RECIPE} --seed 3", [], "fine_tune", ["runs/headers/result.json"]),
    (".", "python3 final_test.py --student res8 --training_type kd --teacher res110 --saved_path runs/teacher.pth "
          f"--path_to_save runs/res8_kd.pth {RECIPE} --kd_alpha 0.1 --seed 3 --kd_temperature 5", [], "kd",
     ["runs/res8_kd.json"]),
    (".", "python3 final_test.py --student res8 --teacher res110 --saved_path runs/teacher.pth "
          f"--saved_intermediates_directory runs/headers --alpha 0.1 --temperature 5 {RECIPE} --seed 3 "
          "--path_to_save runs/dih_model.pth", [], "dih", ["runs/dih_model.json"]),
    (".", "python3 final_test.py --student res8 --training_type fitnets --teacher res110 --saved_path runs/teacher.pth "
          "--path_to_save runs/stage_1.pth --epochs_fitnets_1 40 --nesterov_fitnets_1 True --momentum_fitnets_1 0.9 "
          f"--lr_fitnets_1 0.1 --wd_fitnets_1 0.0005 {RECIPE} --seed 3", ["--epochs_fitnets_1", "1"], "fitnets",
     ["runs/stage_1.json", "runs/stage_1_final.json"]),
    (".", "python3 CRD/train_student.py " + FEATURE_FLAGS.format(out="runs/res8_crd.pth"), [], "crd",
     [f"runs/res8_crd_s{s}.json" for s in SEEDS]),
    (".", "python3 TOFD/tofd_train.py " + FEATURE_FLAGS.format(out="runs/res8_tofd.pth"), [], "tofd",
     [f"runs/res8_tofd_s{s}.json" for s in SEEDS]),
    ("MHKD", "python3 train_mhkd.py " + FEATURE_FLAGS.format(out="runs/res8_mhkd.pth"), ["--data_dir", "../data"],
     "mhkd", [f"runs/res8_mhkd_s{s}.json" for s in SEEDS]),
    (".", "python3 MHKD/train_mhkd.py " + FEATURE_FLAGS.format(out="runs/res8_mhkd.pth"), [], "mhkd",
     [f"runs/res8_mhkd_s{s}.json" for s in SEEDS]),
]
# Checksums are compared by torchvision.datasets.cifar's own name for the helper; only it is replaced.
SITECUSTOMIZE = """import os
import torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
"""


def write_tiny_cifar100(folder: Path) -> None:
    """``folder/cifar-100-python``: train and test batches of random pixels (labels cycling through the
    classes), and meta."""
    rng = np.random.default_rng(0)
    for name, n in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        labels = (np.arange(n) % 100).tolist()
        dump_py2(folder / "cifar-100-python" / name,
                 {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name}ing batch 1 of 1",
                  "fine_labels": labels, "coarse_labels": [label // 5 for label in labels],
                  "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    dump_py2(folder / "cifar-100-python" / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                                                    "coarse_label_names": [f"coarse_{i}" for i in range(20)]})


def run_typed(line: str, typed_in: Path, cwd: Path, appended: list, site: Path) -> subprocess.CompletedProcess:
    """Run ``line`` (``python3 <script> <flags>``) as if typed in the repository folder ``typed_in``, from
    ``cwd``, with ``appended`` after its flags. Unlike ``console.run_subprocess`` the repository is not put on
    PYTHONPATH (the scripts find it themselves) and ``site`` is (the checksum ``sitecustomize``)."""
    python, script, *flags = shlex.split(line)
    assert python == "python3"
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, str(typed_in / script), *flags, *appended], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def typed_values(line: str, overridden: set) -> dict:
    """The value of every flag the command types, as the console parses it (those the test overrides left out)."""
    words = shlex.split(line)[2:]
    parser = build_parser()
    parsed = vars(parser.parse_args(words))
    typed = {a.dest for a in parser._actions if any(opt in words for opt in a.option_strings)}
    return {dest: parsed[dest] for dest in typed - overridden}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder playing the repository root: the tiny CIFAR-100 in ``data/``, the ``sitecustomize`` aside, and an
    ``MHKD/`` folder whose ``runs/teacher.pth`` is the root's teacher."""
    root = tmp_path_factory.mktemp("seed")
    write_tiny_cifar100(root / "data")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (root / "MHKD" / "runs").mkdir(parents=True)
    (root / "MHKD" / "runs" / "teacher.pth").symlink_to(root / "runs" / "teacher.pth")
    return root


def run_and_check(root: Path, folder: str, line: str, extra: list, training_type: str, results: list) -> None:
    """Run one command as typed and check that it completed and recorded the flags it typed."""
    appended = SHRINK + extra
    done = run_typed(line, ROOT / folder, root / folder, appended, root / "site")
    assert done.returncode == 0, f"`{line}` (in {folder}/) failed:\n{done.stderr[-3000:]}"
    # A command of several seeds writes one output per seed (``_s<seed>``): its files say so, not its flags.
    expected = typed_values(line, {a.lstrip("-") for a in appended if a.startswith("--")} | {"path_to_save"})
    for result in results:
        record = json.loads((root / folder / result).read_text())
        assert record["complete"] and record["training_type"] == training_type, result
        recorded = {dest: record["args"][dest] for dest in expected}
        assert recorded == expected, f"{result} recorded other values than `{line}` typed"


# About a minute and a half on 2 busy CPU cores (res110 on a CPU: 27 training phases in 9 processes); CI
# runs it like any other test. The teacher and its heads come first; the students, which only read them,
# run two at a time (one process per core).
@pytest.mark.slow
def test_the_seed_commands_run_verbatim(root):
    teacher, heads, *students = COMMANDS
    for command in (teacher, heads):
        run_and_check(root, *command)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(run_and_check, root, *command) for command in students]:
            done.result()
    dih = json.loads((root / "runs" / "dih_model.json").read_text())
    assert dih["meta"]["num_heads"] == 3, "the DIH command distilled from res110's three heads"
