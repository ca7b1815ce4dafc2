"""A SIGTERM stops a pipeline within seconds wherever it lands, start-up included, and the same command then
continues it to the very models an uninterrupted pipeline trains.

Each moment is a real SIGTERM the console process sends itself just before a chosen call (tests/signal_at.py);
the moments follow one pipeline in order, each run resuming where the one before stopped.
"""
import json
import signal
import time
from pathlib import Path

import pytest

from console import run_inprocess
from faults import make_imagefolder, recipe, signalled_run, start, wait_for_state
from test_resume import assert_bit_identical

# (the moment, the function whose call is signalled, which call of it in that process), in pipeline order.
MOMENTS = [
    ("the first step's start-up, before its data", "final_test:load_data", 1),
    ("between the teacher's batches (2 of 4, epoch 1)", "train_funcs:Trainer.step", 2),
    ("the resumed teacher's evaluation of epoch 1", "train_funcs:evaluate_outputs", 1),
    # The teacher resumes in epoch 1 (2 evaluations an epoch: validation and test); its last epoch's
    # evaluation, where a signal was once remembered and then dropped as the run completed: the pipeline
    # went on with its next step.
    ("the teacher's last evaluation", "train_funcs:evaluate_outputs", 3),
    ("the next step's start (the plan records it)", "dihkit.results.pipeline:atomic_write_json", 2),
    ("the student's first checkpoint", "train_funcs:atomic_save", 1),
    ("the kd step's console start-up", "final_test:on_this_machine", 2),
    ("the final report", "report:write_report", 1),
]


def pipeline(data, root) -> list:
    """A pipeline of a teacher, the student alone and KD: 2 epochs of 4 batches each, deterministic."""
    return [*recipe(data, epochs=2), "--batch_size", "30", "--training_type", "pipeline", "--methods", "ce", "kd",
            "--path_to_save", root]


@pytest.mark.slow
def test_sigterm_at_any_moment_of_a_pipeline_stops_it_within_seconds_and_it_resumes(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data")
    assert run_inprocess(pipeline(data, tmp_path / "reference")) == 0
    root = tmp_path / "signalled"
    stops = []
    for moment, target, nth in MOMENTS:
        code, seconds, err = signalled_run(pipeline(data, root), target, nth, tmp_path)
        stops.append((moment, code, round(seconds, 1)))
        # Killed outside a run (no handler: at once), or stopped by the run's handler (128 + 15) in one line.
        assert code in (-signal.SIGTERM, 128 + signal.SIGTERM), (moment, code, err[-3000:])
        assert seconds < 10, (moment, seconds)
        assert "Traceback" not in err, (moment, err[-3000:])
    print(stops)
    assert run_inprocess(pipeline(data, root)) == 0
    for name in ("teacher.pth", "ce_s5.pth", "kd_s5.pth"):
        assert_bit_identical(tmp_path / "reference" / name, root / name)
        got, want = (json.loads((folder / name).with_suffix(".json").read_text()) for folder in (root, tmp_path / "reference"))
        assert [{k: v for k, v in e.items() if k != "epoch_time_s"} for e in got["history"]] == \
            [{k: v for k, v in e.items() if k != "epoch_time_s"} for e in want["history"]]
    assert (root / "report.md").read_text().count("|") == (tmp_path / "reference" / "report.md").read_text().count("|")


def descendants(pid: int) -> set:
    """The processes ``pid`` started, and theirs (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        parents.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        children = parents.get(todo.pop(), set()) - found
        found |= children
        todo += children
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Two seeds in two processes, or a pipeline's steps in two workers; the file whose appearance shows that a worker
# trains (the end of its first epoch).
CONCURRENT = {
    "seeds": (lambda data, root: [*recipe(data, epochs=2), "--batch_size", "30", "--training_type", "ce", "--seed",
                                  "5", "6", "--concurrent_seeds", "2", "--path_to_save", root / "m.pth"],
              ("m_s5.pth", "m_s6.pth"), "m_s5.state.pth"),
    "pipeline": (lambda data, root: [*pipeline(data, root), "--concurrent_seeds", "2"],
                 ("teacher.pth", "ce_s5.pth", "kd_s5.pth"), "teacher.state.pth"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CONCURRENT))
def test_a_sigterm_to_the_parent_alone_stops_its_concurrent_workers_and_the_run_resumes(tmp_path, kind):
    """``kill`` or a scheduler may signal the console alone, not its process group: the seeds' processes or the
    pipeline's workers must stop with it (they once trained on, orphaned), and the run resume to the models an
    uninterrupted one trains."""
    command, models, training = CONCURRENT[kind]
    data = make_imagefolder(tmp_path / "data")
    # Every run in a process of its own at one thread per worker, as the signalled one, to compare bit for bit.
    reference = start(command(data, tmp_path / "reference"), tmp_path)
    assert reference.communicate(timeout=600) and reference.returncode == 0
    root = tmp_path / "signalled"
    proc = start(command(data, root), tmp_path)
    wait_for_state(proc, root / training)
    workers = descendants(proc.pid)
    assert workers, "no worker was running"
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    while any(map(alive, workers)) and time.time() < sent + 30:
        time.sleep(0.05)
    seconds = time.time() - sent
    assert not any(map(alive, workers)), "a worker trains on after its parent stopped"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert seconds < 10, seconds
    assert "Traceback" not in err and "passed on to" in err.splitlines()[-1], err[-3000:]
    resumed = start([*command(data, root), "--resume"], tmp_path)
    err = resumed.communicate(timeout=600)[1]
    assert resumed.returncode == 0, err[-3000:]
    for name in models:
        assert_bit_identical(tmp_path / "reference" / name, root / name)
