"""Shared test set-up: the repository importable from any working directory, and one CPU thread.

Fixtures that several modules need live here; each module keeps only what is its own.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Console processes the tests start inherit one thread too: on a small shared CPU torch's default thread
# count makes a process many times slower (docs/BENCHMARKS.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every run the suite starts, in process or as a console process, computes as on a CPU without native
# bfloat16: oneDNN is capped below AVX512-BF16 and AMX, so --precision auto picks float32 on any machine and
# the suite's figures do not depend on it (tests of the CPU default replace the detection themselves).
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every in-process run trains with one intra-op thread: results are deterministic across machines, and
    on a small shared CPU one thread is much faster than torch's default (docs/BENCHMARKS.md)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A res14 teacher and its three heads trained by the console on the tiny recipe (console.TINY), once per
    test run: ``folder/teacher.pth`` and ``folder/heads``. Tests read them and never write into the folder."""
    from console import TINY, run_inprocess
    folder = tmp_path_factory.mktemp("tiny_teacher")
    assert run_inprocess([*TINY, "--training_type", "ce", "--path_to_save", folder / "teacher.pth"]) == 0
    assert run_inprocess([*TINY, "--training_type", "fine_tune", "--saved_path", folder / "teacher.pth",
                          "--path_to_save", folder / "heads"]) == 0
    return folder


def pytest_addoption(parser):
    """``--runslow``: also run the tests marked ``slow`` (CI and the README's full-suite command do)."""
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (the full suite)")


def pytest_configure(config):
    """``slow``: the heavy tests (benchmark pairs, torchrun, the seed's commands); ``--runslow`` runs them."""
    config.addinivalue_line("markers", "slow: heavy; run with --runslow (CI runs the full suite)")


def pytest_collection_modifyitems(config, items):
    """Without ``--runslow`` the slow tests are skipped, and say how to run them."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run the full suite with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
