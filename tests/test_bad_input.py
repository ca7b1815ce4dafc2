"""Every bad input a user can give ends in one sentence on stderr, exit code 2, no traceback, no file touched.

Each case (``bad_inputs``) prepares what it needs, snapshots the whole temporary tree (names, sizes,
modification times), runs the console in-process and checks the tree again; a few run as real processes
to check the exit code and the absence of a traceback end to end. The decode cache lives inside that tree
(``--cache_dir``, and ``XDG_CACHE_HOME`` for the default), so a refused command that writes one is caught too.
"""
import os
import signal
import subprocess

import pytest

import train_kd
from bad_inputs import CASES, PREPARE, edited
from console import run_inprocess
from faults import make_imagefolder, recipe, start, tree


def cached_recipe(base, epochs: int = 3) -> list:
    """The recipe on the module's data, its decode cache inside the checked tree."""
    return [*recipe(base / "data", epochs), "--cache_dir", base / "cache"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Data, a teacher, its heads, a perturbed copy of the teacher, and a KD run interrupted in epoch 2; the
    user's cache folder (``XDG_CACHE_HOME``) inside the tree for the module's tests."""
    base = tmp_path_factory.mktemp("bad")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(base / "xdg"))
        yield prepared(base)


def prepared(base):
    """``base`` with everything the cases use (see ``base``)."""
    make_imagefolder(base / "data")
    one = cached_recipe(base, epochs=1)
    assert run_inprocess([*one, "--training_type", "ce", "--path_to_save", base / "teacher.pth"]) == 0
    assert run_inprocess([*one, "--training_type", "fine_tune", "--saved_path", base / "teacher.pth",
                          "--path_to_save", base / "heads"]) == 0
    edited(base / "teacher.pth", base / "other_teacher.pth", {"fc.bias": 0.5})
    calls = {"n": 0}
    forward = train_kd.Distillation.forward

    def interrupt_in_epoch_2(self, x, y, idx):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, batch 1 (three batches an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, x, y, idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_kd.Distillation, "forward", interrupt_in_epoch_2)
        code = run_inprocess([*cached_recipe(base), "--training_type", "kd", "--saved_path", base / "teacher.pth",
                              "--path_to_save", base / "interrupted" / "kd.pth"])
    assert code == 128 + signal.SIGINT and (base / "interrupted" / "kd.state.pth").is_file()
    (base / "cases").mkdir()
    return base


def command(base, folder, args) -> list:
    """The recipe as CE (a case's flags override both), writing into the case's folder unless it says where."""
    out = [] if "--path_to_save" in map(str, args) else ["--path_to_save", folder / "out.pth"]
    return [*cached_recipe(base), "--training_type", "ce", *args, *out]


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
    holder = PREPARE[case](base, folder) if case in PREPARE else None
    try:
        args = command(base, folder, build(base, folder))
        before = tree(base)
        capsys.readouterr()
        code = run_inprocess(args)
        err = capsys.readouterr().err
        check_refused(code, err, expected)
        assert tree(base) == before, "a refused command changed files"
        assert not (folder / "marker").exists(), "unpickling ran code"
    finally:
        if isinstance(holder, subprocess.Popen):  # a live run's claim, held for the case
            holder.kill()
            holder.wait()


def test_there_are_at_least_a_hundred_distinct_bad_inputs():
    assert len(CASES) >= 100


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
