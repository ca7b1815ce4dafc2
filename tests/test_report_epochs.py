"""``report.py --epoch last|best``: which epoch's test top-1 each table, CSV line, comparison and plot shows, and
that every one of them says so ("best" is selected on the test set, as mdistiller's and LS's tables are)."""
import csv

import pytest

import report
from dihkit.results import report_plots
from test_results import fake, heads_outputs, markdown_rows, write

BEST_TITLE = "best test epoch, selected on the test set"


@pytest.fixture
def runs(tmp_path):
    """res110 -> res8 runs whose best test epoch is not their last one (by hand, below)."""
    folder = tmp_path / "runs"
    write(folder / "teacher.json", fake("ce", 30, 72.0, arch="res110", history=[40.0, 73.0, 72.0]))
    heads = fake("fine_tune", 30, 0, outputs=heads_outputs([40.0, 55.0]))
    heads["history"] = [{"epoch": e, "test": heads_outputs(v)} for e, v in ((1, [42.0, 50.0]), (2, [40.0, 55.0]))]
    write(folder / "heads" / "result.json", heads)
    write(folder / "kd_s30.json", fake("kd", 30, 70.0, history=[50.0, 71.0, 70.0], best=70.5))
    write(folder / "kd_s50.json", fake("kd", 50, 72.0, history=[51.0, 69.0, 72.0], best=71.5))
    write(folder / "dih_s30.json", fake("dih", 30, 74.0, history=[52.0, 76.5, 74.0]))
    return folder


def test_best_is_each_runs_highest_test_epoch_and_says_it_was_selected_on_test(runs, tmp_path):
    text = report.write_report([runs], tmp_path / "best", epoch="best")
    best = markdown_rows(text, BEST_TITLE)
    assert best["teacher"] == ["73.00 (n=1)"]
    assert best["head 1"] == ["42.00 (n=1)"] and best["head 2"] == ["55.00 (n=1)"]
    assert best["kd"] == ["71.50 ± 0.71 (n=2)"]  # 71 (epoch 2) and 72 (epoch 3)
    assert best["dih"] == ["76.50 (n=1)"]
    assert "## Test top-1 (%), last epoch" not in text
    assert markdown_rows(text, "best-validation epoch")["kd"] == ["71.00 ± 0.71 (n=2)"]  # 70.5 and 71.5
    rows = list(csv.DictReader((tmp_path / "best.csv").open()))
    kd = next(r for r in rows if (r["row"], r["selection"]) == ("kd", "best_test_selected_on_test"))
    assert kd["values"] == "71.0000 72.0000"
    assert {r["selection"] for r in rows} == {"best_test_selected_on_test", "best_val"}


def test_last_stays_the_default(runs, tmp_path):
    text = report.write_report([runs], tmp_path / "last")
    last = markdown_rows(text, "last epoch")
    assert last["teacher"] == ["72.00 (n=1)"] and last["kd"] == ["71.00 ± 1.41 (n=2)"]
    assert last["dih"] == ["74.00 (n=1)"]
    assert BEST_TITLE not in text.split("Protocol:")[0]
    assert report.main([str(runs), "--out", str(tmp_path / "cli"), "--epoch", "best"]) == 0
    assert f"## Test top-1 (%), {BEST_TITLE}" in (tmp_path / "cli.md").read_text()


def test_comparisons_and_plots_name_their_selection(runs, tmp_path, monkeypatch):
    text = report.write_report([runs], tmp_path / "cmp", against="kd", epoch="best")
    assert f"## Differences from kd (test top-1, {BEST_TITLE})" in text
    assert "| dih | 76.50 (n=1) | +5.00 |" in text
    drawn = []
    monkeypatch.setattr(report_plots, "finish_axes", lambda fig, ax, path: drawn.append((ax.get_title(),
                                                                                          ax.get_ylabel())))
    report.write_report([runs], tmp_path / "plots", plots=True, epoch="best")
    curves, depth = drawn
    assert f"teacher line: {BEST_TITLE}" in curves[0] and depth[1] == f"test top-1 (%), {BEST_TITLE}"
    drawn.clear()
    report.write_report([runs], tmp_path / "plots", plots=True)
    assert "teacher line: last epoch" in drawn[0][0] and drawn[1][1] == "test top-1 (%), last epoch"
