"""A SIGTERM stops a pipeline within seconds wherever it lands, start-up included, and the same command then
continues it to the very models an uninterrupted pipeline trains.

Each moment is a real SIGTERM the console process sends itself just before a chosen call (tests/signal_at.py);
the moments follow one pipeline in order, each run resuming where the one before stopped.
"""
import json
import signal

import pytest

from console import run_inprocess
from faults import make_imagefolder, recipe, signalled_run
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
