"""Every bad input a user can give ends in one sentence on stderr, exit code 2, no traceback, no file touched.

Each case prepares what it needs, snapshots the whole temporary tree (names, sizes, modification
times), runs the console in-process and checks the tree again; a few run as real processes to check
the exit code and the absence of a traceback end to end.
"""
import os
import signal

import pytest
import torch

import train_kd
from checkpoints import model_record
from console import run_inprocess
from faults import make_imagefolder, one_thread, recipe, start, tree  # noqa: F401
from models_repo import build_model


class Evil:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """Data, a teacher, its heads, a perturbed copy of the teacher, and a KD run interrupted in epoch 2."""
    base = tmp_path_factory.mktemp("bad")
    data = make_imagefolder(base / "data")
    one = recipe(data, epochs=1)
    assert run_inprocess([*one, "--training_type", "ce", "--path_to_save", base / "teacher.pth"]) == 0
    assert run_inprocess([*one, "--training_type", "fine_tune", "--saved_path", base / "teacher.pth",
                          "--path_to_save", base / "heads"]) == 0
    record = torch.load(base / "teacher.pth", weights_only=True)
    record["state_dict"]["fc.bias"] += 0.01
    torch.save(record, base / "other_teacher.pth")
    calls = {"n": 0}
    forward = train_kd.Distillation.forward

    def interrupt_in_epoch_2(self, x, y, idx):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, batch 1 (three batches an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, x, y, idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_kd.Distillation, "forward", interrupt_in_epoch_2)
        code = run_inprocess([*recipe(data), "--training_type", "kd", "--saved_path", base / "teacher.pth",
                              "--path_to_save", base / "interrupted" / "kd.pth"])
    assert code == 128 + signal.SIGINT and (base / "interrupted" / "kd.state.pth").is_file()
    (base / "cases").mkdir()
    return base


def write(path, content: bytes = b"") -> None:
    """Create ``path`` (and its folders) with ``content``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def save(obj, path) -> None:
    """torch.save ``obj`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def copy_heads(base, case, drop=(), extra=(), swap=None):
    """A copy of the fixture's heads in the case folder, with heads dropped, added or replaced."""
    folder = case / "heads"
    folder.mkdir()
    for i in (1, 2, 3):
        if i not in drop:
            source = base / "heads" / f"head_{swap[1] if swap and swap[0] == i else i}.pth"
            (folder / f"head_{i}.pth").write_bytes(source.read_bytes())
    for i in extra:
        (folder / f"head_{i}.pth").write_bytes((base / "heads" / "head_1.pth").read_bytes())
    return folder


def dataset(case, layout: dict) -> object:
    """An image-folder dataset in ``case/data`` from ``{relative path: image size or raw bytes}``."""
    from PIL import Image
    root = case / "data"
    root.mkdir()
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            Image.new("RGB", (content, content), (120, 30, 200)).save(path)
        elif content is not None:
            path.write_bytes(content)
    return root


def good_split(size=16, per_class=3, classes=("a", "b")) -> dict:
    """The files of a valid small split, per class."""
    return {f"{c}/{n}.png": size for c in classes for n in range(per_class)}


def prefixed(d: dict, prefix: str) -> dict:
    """``d`` with every key under ``prefix``."""
    return {f"{prefix}/{k}": v for k, v in d.items()}


def res_state(arch, classes) -> dict:
    """A plain state dict of a fresh registry model, as other code would save it."""
    return build_model(arch, classes).state_dict()


KD = ["--training_type", "kd"]
DIH = ["--training_type", "dih"]

# id -> (build(base, case) -> extra console args, expected words of the message). The recipe's flags come first,
# so a case's flags override them.
CASES = {
    "unknown_training_type": (lambda b, c: ["--training_type", "distil"], "invalid choice"),
    "unknown_student": (lambda b, c: ["--student", "res999"], "invalid choice"),
    "unknown_dataset": (lambda b, c: ["--dataset", "mnist"], "invalid choice"),
    "bad_boolean": (lambda b, c: ["--nesterov", "maybe"], "expected True/False"),
    "non_numeric_epochs": (lambda b, c: ["--epochs", "three"], "invalid int value"),
    "negative_batch_size": (lambda b, c: ["--batch_size", "-4"], "--batch_size must be an integer >= 1, got -4"),
    "zero_epochs": (lambda b, c: ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    "alpha_above_one": (lambda b, c: [*KD, "--kd_alpha", "1.5"], "must be a finite number >= 0 and <= 1, got 1.5"),
    "alpha_below_zero": (lambda b, c: [*KD, "--alpha", "-0.1"], "must be a finite number >= 0 and <= 1, got -0.1"),
    "temperature_zero": (lambda b, c: [*KD, "--kd_temperature", "0"], "temperature must be a finite number > 0, got 0"),
    "temperature_negative": (lambda b, c: [*KD, "--temperature", "-2"], "temperature must be a finite number > 0, got -2"),
    "milestone_beyond_epochs": (lambda b, c: ["--schedule", "5"], "milestone 5 is outside 1..3"),
    "zero_learning_rate": (lambda b, c: ["--lr", "0"], "--lr must be a finite number > 0, got 0"),
    "resume_with_overwrite": (lambda b, c: ["--resume", "--overwrite"], "contradict"),
    "gpu_that_does_not_exist": (lambda b, c: ["--gpu_id", "cuda:7"], "cuda:7"),
    "gpu_id_garbage": (lambda b, c: ["--gpu_id", "banana"], "--gpu_id must be cuda:N or cpu"),
    "val_size_not_multiple": (lambda b, c: ["--val_size", "21"], "multiple of the number of classes"),
    "train_subset_too_large": (lambda b, c: ["--train_subset", "400"], "images per class"),
    "dataset_folder_empty": (lambda b, c: ["--data_dir", dataset(c, {})], "one subfolder per class"),
    "dataset_without_classes": (lambda b, c: ["--data_dir", dataset(c, {"train/x.txt": b"", "test/x.txt": b""})],
                                "no class subfolders"),
    "class_without_images": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                      "train/c/notes.txt": b"x",
                                                                      **prefixed(good_split(classes="abc"), "test")})],
                             "contains no images"),
    "unreadable_image": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                  "train/b/broken.png": b"\x89PNG\r\n\x1a\n garbage",
                                                                  **prefixed(good_split(), "test")})],
                         "broken.png"),
    "test_classes_differ": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                     **prefixed(good_split(classes="ax"), "test")})],
                            "same class folders"),
    "images_of_mixed_sizes": (lambda b, c: ["--data_dir", dataset(c, {**prefixed(good_split(), "train"),
                                                                       "train/a/big.png": 24,
                                                                       **prefixed(good_split(), "test")})],
                              "big.png"),
    "teacher_missing": (lambda b, c: [*KD, "--saved_path", c / "nope.pth"], "does not exist"),
    "teacher_not_given": (lambda b, c: KD, "needs --saved_path"),
    "teacher_truncated": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "truncated"),
    "teacher_empty_file": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "truncated"),
    "teacher_text_file": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "not a PyTorch checkpoint"),
    "teacher_is_a_folder": (lambda b, c: [*KD, "--saved_path", c], "is a folder"),
    "teacher_of_other_architecture": (lambda b, c: [*KD, "--teacher", "res14", "--saved_path", b / "teacher.pth"],
                                      "holds a res8, not the requested res14"),
    "foreign_teacher_of_other_architecture": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "does not fit"),
    "teacher_of_other_class_count": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "trained for 10 classes"),
    "foreign_teacher_of_other_class_count": (lambda b, c: [*KD, "--saved_path", c / "t.pth"],
                                             "'fc.weight' has shape (10, 64), expected (4, 64)"),
    "teacher_crafted_pickle": (lambda b, c: [*KD, "--saved_path", c / "t.pth"], "refused"),
    "head_file_as_teacher": (lambda b, c: [*KD, "--saved_path", b / "heads" / "head_1.pth"], "is a head file"),
    "heads_not_given": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth"],
                        "needs --saved_intermediates_directory"),
    "heads_folder_missing": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                           "--saved_intermediates_directory", c / "nope"], "does not exist"),
    "heads_folder_empty": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                         "--saved_intermediates_directory", c], "holds no head_<i>.pth"),
    "head_missing": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                   "--saved_intermediates_directory", copy_heads(b, c, drop=(2,))], "lacks head_2.pth"),
    "head_extra": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                 "--saved_intermediates_directory", copy_heads(b, c, extra=(4,))], "extra head_4.pth"),
    "head_mismatched": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                      "--saved_intermediates_directory", copy_heads(b, c, swap=(2, 3))],
                        "holds head 3, not head 2"),
    "heads_of_another_teacher_checkpoint": (lambda b, c: [*DIH, "--saved_path", b / "other_teacher.pth",
                                                          "--saved_intermediates_directory", b / "heads"],
                                            "fine-tuned on a different res8 checkpoint"),
    "head_truncated": (lambda b, c: [*DIH, "--saved_path", b / "teacher.pth",
                                     "--saved_intermediates_directory", c / "heads"], "truncated"),
    "output_under_a_file": (lambda b, c: ["--path_to_save", c / "file" / "sub" / "m.pth"], "is a file, not a folder"),
    "output_exists": (lambda b, c: ["--path_to_save", b / "teacher.pth"], "already exists; pass --overwrite"),
    "interrupted_run_without_resume": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--path_to_save",
                                                     b / "interrupted" / "kd.pth"], "pass --resume to continue it"),
    "file_output_is_a_folder": (lambda b, c: ["--path_to_save", c], "is a folder, but"),
    "heads_output_is_a_file": (lambda b, c: ["--training_type", "fine_tune", "--saved_path", b / "teacher.pth",
                                             "--path_to_save", b / "teacher.pth"], "is a file, but"),
    "second_seed_output_exists": (lambda b, c: ["--seed", "1", "2", "--path_to_save", c / "m.pth"],
                                  "m_s2.pth' already exists"),
    "resume_with_changed_lr": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume", "--lr", "0.05",
                                             "--path_to_save", b / "interrupted" / "kd.pth"], "--lr was 0.1"),
    "resume_with_changed_seed": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume", "--seed", "6",
                                               "--path_to_save", b / "interrupted" / "kd.pth"], "--seed was 5"),
    "resume_with_changed_student": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume", "--student",
                                                  "res14", "--path_to_save", b / "interrupted" / "kd.pth"],
                                    "--student was 'res8'"),
    "resume_with_changed_loss_weight": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume",
                                                      "--kd_alpha", "0.3", "--path_to_save",
                                                      b / "interrupted" / "kd.pth"], "--kd_alpha was 0.1"),
    "resume_with_other_teacher": (lambda b, c: [*KD, "--saved_path", b / "other_teacher.pth", "--resume",
                                                "--path_to_save", b / "interrupted" / "kd.pth"],
                                  "frozen teacher or heads differ"),
    "resume_with_other_method": (lambda b, c: ["--training_type", "ce", "--resume", "--path_to_save",
                                               b / "interrupted" / "kd.pth"], "belongs to phase kd, not ce"),
    "resume_from_corrupted_checkpoint": (lambda b, c: [*KD, "--saved_path", b / "teacher.pth", "--resume",
                                                       "--path_to_save", c / "kd.pth"], "resume state"),
    "evaluate_without_model": (lambda b, c: ["--training_type", "test"], "needs --saved_path"),
    "fitnets_layer_that_does_not_exist": (lambda b, c: ["--training_type", "fitnets", "--saved_path",
                                                        b / "teacher.pth", "--hint_layer", "9"], "--hint_layer 9"),
    "assistant_larger_than_teacher": (lambda b, c: ["--training_type", "takd", "--saved_path", b / "teacher.pth",
                                                    "--ta", "res110"], "larger than the teacher"),
}

# Files some cases need, written before the snapshot.
PREPARE = {
    "teacher_truncated": lambda b, c: write(c / "t.pth", (b / "teacher.pth").read_bytes()[:5000]),
    "teacher_empty_file": lambda b, c: write(c / "t.pth"),
    "teacher_text_file": lambda b, c: write(c / "t.pth", b"these are not weights\n"),
    "foreign_teacher_of_other_architecture": lambda b, c: save(res_state("res14", 4), c / "t.pth"),
    "teacher_of_other_class_count": lambda b, c: save(model_record(build_model("res8", 10), "res8", 10, "imagefolder",
                                                                   16), c / "t.pth"),
    "foreign_teacher_of_other_class_count": lambda b, c: save(res_state("res8", 10), c / "t.pth"),
    "teacher_crafted_pickle": lambda b, c: save({"state_dict": Evil(c / "marker")}, c / "t.pth"),
    "head_truncated": lambda b, c: write(copy_heads(b, c) / "head_2.pth",
                                         (b / "heads" / "head_2.pth").read_bytes()[:3000]),
    "output_under_a_file": lambda b, c: write(c / "file", b"a file, not a folder"),
    "second_seed_output_exists": lambda b, c: write(c / "m_s2.pth", b"an earlier result"),
    "resume_from_corrupted_checkpoint": lambda b, c: write(
        c / "kd.state.pth", (b / "interrupted" / "kd.state.pth").read_bytes()[:-100]),
}


def command(base, folder, args) -> list:
    """The recipe as CE (a case's flags override both), writing into the case's folder unless it says where."""
    out = [] if "--path_to_save" in map(str, args) else ["--path_to_save", folder / "out.pth"]
    return [*recipe(base / "data"), "--training_type", "ce", *args, *out]


def check_refused(code: int, err: str, expected: str) -> None:
    """Exit code 2 and exactly one line on stderr, naming what is wrong."""
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.strip(), f"not one line: {err!r}"
    assert "error: " in err and expected in err, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_without_touching_files(base, case, capsys):
    build, expected = CASES[case]
    folder = base / "cases" / case
    folder.mkdir()
    if case in PREPARE:
        PREPARE[case](base, folder)
    args = command(base, folder, build(base, folder))
    before = tree(base)
    capsys.readouterr()
    code = run_inprocess(args)
    err = capsys.readouterr().err
    check_refused(code, err, expected)
    assert tree(base) == before, "a refused command changed files"
    assert not (folder / "marker").exists(), "unpickling ran code"


def test_there_are_at_least_thirty_distinct_bad_inputs():
    assert len(CASES) >= 30


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the path under a file "
                                               "(output_under_a_file) covers unwritable output instead")
def test_read_only_output_folder_is_refused(base, capsys):
    folder = base / "cases" / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        before = tree(base)
        code = run_inprocess(command(base, folder, ["--path_to_save", folder / "m.pth"]))
        check_refused(code, capsys.readouterr().err, "is not writable")
        assert tree(base) == before
    finally:
        folder.chmod(0o755)


# As real processes: argparse, a missing file, a crafted pickle and an unwritable output.
SUBPROCESS_CASES = ["unknown_student", "teacher_missing", "teacher_crafted_pickle", "output_under_a_file"]


def test_bad_input_as_a_process_exits_2_in_one_line(base):
    runs = {}
    for case in SUBPROCESS_CASES:
        folder = base / "cases" / f"process_{case}"
        folder.mkdir()
        if case in PREPARE:
            PREPARE[case](base, folder)
        runs[case] = command(base, folder, CASES[case][0](base, folder))
    before = tree(base)
    procs = {case: start(args, base) for case, args in runs.items()}
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        check_refused(proc.returncode, err, CASES[case][1])
    assert tree(base) == before
    assert not (base / "cases" / "process_teacher_crafted_pickle" / "marker").exists()
