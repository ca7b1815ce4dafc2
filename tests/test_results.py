"""From runs to results: the pipeline (layout, skipping, resuming), the report's table checked by hand,
its plots, and the sweep scripts' commands."""
import contextlib
import csv
import io
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import dataload
import final_test
from dihkit.results import pipeline
import report
from dihkit.results import report_compare
from dihkit.runs import run_state
import train_funcs
from dihkit.console.console_flags import DEFAULT_METHODS
from dihkit.foundations.registry import REGISTRY, ordered
from console import ROOT, TINY, data_loaded_once, run_inprocess

SEEDS = (3, 4)
# The pipeline's bookkeeping is under test, not accuracy: a smaller training set and test split.
SMALL = ["--train_subset", "60", "--batch_size", "30"]
TEST_IMAGES = 100


def pipeline_args(root, *extra):
    """The tiny recipe as one pipeline command (later flags override TINY's)."""
    return [*TINY, *SMALL, "--training_type", "pipeline", "--seed", *SEEDS, "--path_to_save", root, *extra]


@pytest.fixture(scope="module", autouse=True)
def small_test_split():
    """Evaluate on the first TEST_IMAGES test images only (every epoch of every step evaluates the test
    split), and generate the data once for the module rather than once per pipeline command."""
    with data_loaded_once(TEST_IMAGES):
        yield


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``--methods ce kd dih`` (the default) over two seeds, run once for the whole module."""
    root = tmp_path_factory.mktemp("sweep") / "synthetic_res14_res8"
    assert run_inprocess(pipeline_args(root)) == 0
    return root


def outputs(root):
    """Modification times of every output the steps wrote (the report and the manifest are rewritten)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(("report", pipeline.MANIFEST))}


def read(path):
    return json.loads(path.read_text())


def test_pipeline_writes_the_documented_layout(sweep):
    students = {f"{m}_s{s}" for m in ("ce", "kd", "dih") for s in SEEDS}
    names = {p.name for p in sweep.iterdir()}
    plots = {f"report_{kind}_synthetic_res14_res8.png" for kind in ("curves", "depth")}
    assert names == ({"teacher.pth", "teacher.json", "heads", "pipeline.json", "report.md", "report.csv"} | plots
                     | {f"{n}.pth" for n in students} | {f"{n}.json" for n in students})
    assert all((sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots)
    assert sorted(p.name for p in (sweep / "heads").iterdir()) == ["head_1.pth", "head_2.pth", "head_3.pth",
                                                                   "result.json"]
    teacher, heads = read(sweep / "teacher.json"), read(sweep / "heads" / "result.json")
    assert teacher["meta"]["arch"] == "res14" and teacher["seed"] == SEEDS[0] and teacher["complete"]
    assert heads["training_type"] == "fine_tune" and heads["seed"] == SEEDS[0]
    assert heads["args"]["saved_path"] == str(sweep / "teacher.pth")
    for seed in SEEDS:
        ce, kd, dih = (read(sweep / f"{m}_s{seed}.json") for m in ("ce", "kd", "dih"))
        assert ce["meta"]["arch"] == "res8" and ce["training_type"] == "ce" and ce["seed"] == seed
        assert kd["args"]["saved_path"] == dih["args"]["saved_path"] == str(sweep / "teacher.pth")
        assert dih["args"]["saved_intermediates_directory"] == str(sweep / "heads")
        assert kd["seed"] == dih["seed"] == seed and kd["complete"] and dih["complete"]
        assert kd["args"]["train_subset"] == 60 and kd["args"]["seed"] == [seed]  # flags passed through
    manifest = read(sweep / "pipeline.json")
    assert [s["status"] for s in manifest["steps"]] == ["complete"] * 8
    # Each step's result records the step's own command, as the plan lists it, and where it ran.
    results = [teacher, heads] + [read(sweep / f"{m}_s{s}.json") for s in SEEDS for m in ("ce", "kd", "dih")]
    assert [r["command"] for r in results] == [s["command"] for s in manifest["steps"]]
    assert all(r["cwd"] == os.getcwd() and " --seed " in r["command"] for r in results)
    assert (manifest["dataset"], manifest["teacher"], manifest["student"]) == ("synthetic", "res14", "res8")


def test_pipeline_report_holds_every_run(sweep):
    table = (sweep / "report.md").read_text()
    rows = markdown_rows(table, "last epoch")
    kd = [read(sweep / f"kd_s{s}.json")["test_top1"] for s in SEEDS]
    mean, std = (kd[0] + kd[1]) / 2, abs(kd[0] - kd[1]) / math.sqrt(2)
    assert rows["kd"] == [f"{mean:.2f} ± {std:.2f} (n=2)"]
    assert rows["teacher"] == [f"{read(sweep / 'teacher.json')['test_top1']:.2f} (n=1)"]
    assert set(rows) == {"teacher", "head 1", "head 2", "head 3", "ce (student alone)", "kd", "dih"}


def test_rerun_trains_nothing(sweep, monkeypatch, capsys):
    before = outputs(sweep)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished step was run again")

    monkeypatch.setattr(train_funcs.Trainer, "run", refuse)
    monkeypatch.setattr(dataload, "load_data", refuse)
    assert run_inprocess(pipeline_args(sweep)) == 0
    # Flags of methods the folder's runs do not use (FitNets, TAKD) do not make them stale.
    assert run_inprocess(pipeline_args(sweep, "--epochs_fitnets_1", 2, "--ta", "res8")) == 0
    assert outputs(sweep) == before
    assert capsys.readouterr().out.count("complete, skipped") == 16


def test_rerun_with_another_training_flag_is_refused(sweep, capsys):
    before = outputs(sweep)
    assert run_inprocess(pipeline_args(sweep, "--kd_alpha", 0.5)) == 2
    err = capsys.readouterr().err.strip()
    # The teacher's ce step does not depend on --kd_alpha (not in its result keys): the first KD student is stale.
    assert err.startswith("error: kd seed 3 finished in") and "--kd_alpha 0.1" in err and "0.5" in err
    assert outputs(sweep) == before


def test_killed_step_resumes_with_the_same_command(sweep, tmp_path, monkeypatch, capsys):
    root = tmp_path / "copy"
    shutil.copytree(sweep, root)
    for name in ("kd_s4.pth", "kd_s4.json"):
        (root / name).unlink()
    kept = outputs(root)
    # SIGTERM during the first batch: the loop writes its checkpoint and stops, as a killed sweep does.
    requested = run_state.StopFlag.requested

    def signalled(self, batch=None):
        if self.signum is None:
            self.handle(signal.SIGTERM, None)
        return requested(self, batch)

    monkeypatch.setattr(run_state.StopFlag, "requested", signalled)
    assert run_inprocess(pipeline_args(root)) == 128 + signal.SIGTERM
    assert (root / "kd_s4.state.pth").is_file() and not (root / "kd_s4.json").exists()
    monkeypatch.undo()
    capsys.readouterr()

    assert run_inprocess(pipeline_args(root)) == 0
    out = capsys.readouterr().out
    assert "--resume" in next(line for line in out.splitlines() if line.startswith("== [7/8] kd seed 4"))
    assert "[kd] resuming" in out and out.count("complete, skipped") == 7
    assert read(root / "kd_s4.json")["complete"] and not (root / "kd_s4.state.pth").exists()
    assert {p: t for p, t in outputs(root).items() if p in kept} == kept


def test_pretrained_teacher_and_heads_are_used_not_trained(sweep, tmp_path):
    root = tmp_path / "reuse"
    code = run_inprocess(pipeline_args(root, "--seed", 3, "--methods", "dih", "--saved_path", sweep / "teacher.pth",
                                       "--saved_intermediates_directory", sweep / "heads"))
    assert code == 0
    assert not (root / "teacher.pth").exists() and not (root / "heads").exists()
    dih = read(root / "dih_s3.json")
    assert dih["args"]["saved_path"] == str(sweep / "teacher.pth")
    assert dih["reference_test"]["head_2"] == read(sweep / "dih_s3.json")["reference_test"]["head_2"]


def test_plan_sets_each_steps_flags_and_passes_the_rest_through(tmp_path):
    parser = final_test.build_parser()
    args = parser.parse_args(["--training_type", "pipeline", "--methods", "ce", "fitnets", "dih", "--seed", "7", "8",
                              "--epochs", "10", "--schedule", "5", "--teacher_epochs", "20", "--teacher_schedule",
                              "8", "16", "--temperature", "4", "--nesterov", "no", "--precision", "bf16",
                              "--epochs_fitnets_1", "3", "--train_subset", "100", "--label_noise", "0.2",
                              "--teacher_train_subset", "0", "--teacher_label_noise", "0",
                              "--path_to_save", str(tmp_path)])
    steps = pipeline.plan(args, parser, tmp_path)
    assert [s.name for s in steps] == ["teacher res110", "heads", "ce seed 7", "fitnets seed 7", "dih seed 7",
                                       "ce seed 8", "fitnets seed 8", "dih seed 8"]
    parsed = {s.name: parser.parse_args(list(s.argv)) for s in steps}
    teacher, heads, ce, fitnets, dih = (parsed[n] for n in ("teacher res110", "heads", "ce seed 8", "fitnets seed 8",
                                                            "dih seed 8"))
    assert (teacher.training_type, teacher.epochs, teacher.schedule, teacher.seed) == ("ce", 20, [8, 16], [7])
    # The teacher's own data; the heads and the students train on --train_subset and --label_noise.
    assert (teacher.train_subset, teacher.label_noise) == (0, 0.0)
    assert all((parsed[n].train_subset, parsed[n].label_noise) == (100, 0.2) for n in parsed if n != "teacher res110")
    # What each step waits for under --concurrent_seeds: the teacher and heads it reads.
    assert {s.name: s.after for s in steps} == {
        "teacher res110": (), "heads": ("teacher res110",), "ce seed 7": (), "ce seed 8": (),
        "fitnets seed 7": ("teacher res110",), "fitnets seed 8": ("teacher res110",),
        "dih seed 7": ("heads", "teacher res110"), "dih seed 8": ("heads", "teacher res110")}
    assert (heads.training_type, heads.epochs, heads.saved_path) == ("fine_tune", 10, str(tmp_path / "teacher.pth"))
    assert heads.path_to_save == str(tmp_path / "heads") and heads.seed == [7]
    assert (ce.teacher, ce.saved_path, ce.path_to_save) == ("res8", None, str(tmp_path / "ce_s8.pth"))
    assert dih.saved_intermediates_directory == str(tmp_path / "heads") and dih.seed == [8]
    for step in parsed.values():  # the pipeline's own flags never reach a step; the others always do
        assert (step.kd_temperature, step.nesterov, step.precision, step.epochs_fitnets_1) == (4.0, False, "bf16", 3)
        assert step.methods == list(DEFAULT_METHODS) and step.teacher_epochs is None and not step.resume
        assert step.teacher_train_subset is None and step.teacher_label_noise is None and step.concurrent_seeds == 1
    # FitNets' final student is stage 2's file: that result decides whether the step is finished.
    assert steps[3].final.result == tmp_path / "fitnets_s7_final.json"


def test_result_keys_are_what_each_type_trains_with():
    keys = {name: set(t.result_keys) for name, t in REGISTRY.items()}
    assert {"lr", "epochs", "schedule", "teacher"} <= keys["ce"] and not {"kd_alpha", "student"} & keys["ce"]
    assert keys["fine_tune"] - keys["ce"] == {"head_selection"}
    assert keys["kd"] - keys["ce"] == {"student", "kd_alpha", "kd_temperature", "logit_std", "ce_weight", "kd_weight"}
    assert keys["dih"] - keys["kd"] == {"cohort_loss", "dkd_alpha", "dkd_beta", "dkd_warmup", "dist_beta", "dist_gamma"}
    assert keys["fitnets"] - keys["kd"] >= {"epochs_fitnets_1", "hint_layer"}
    assert keys["takd"] - keys["kd"] == {"ta"}
    assert {"beta", "nce_k"} <= keys["crd"] and "beta" in keys["tofd"] and "nce_k" not in keys["tofd"]


@pytest.mark.parametrize("extra, message", [
    (["--saved_intermediates_directory", "h"], "needs --saved_path"),
    (["--methods", "kd", "kd"], "more than once"),
    (["--teacher_epochs", "2", "--teacher_schedule", "5"], "outside 1..2"),
    (["--summary"], "--summary"),
])
def test_pipeline_refuses_bad_commands_before_training(tmp_path, capsys, extra, message):
    assert run_inprocess(pipeline_args(tmp_path / "p", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- the report on written records

def fake(tt, seed, top1, *, phase=None, teacher="res110", student="res8", arch=None, best=None, dataset="synthetic",
         complete=True, history=(), outputs=None, reference=None, **args):
    """A small result record with the fields the report reads."""
    final = outputs or {"student": {"top1": top1, "top5": 99.0}}
    record = {"training_type": tt, "phase": phase or tt, "seed": seed, "complete": complete,
              "args": {"dataset": dataset, "teacher": teacher, "student": student, "seed": [seed], "epochs": 3,
                       "kd_alpha": 0.1, **args},
              "meta": {"arch": arch or (teacher if tt == "ce" else student)},
              "history": [{"epoch": i + 1, "test": {"student": {"top1": v, "top5": 99.0}}} for i, v in enumerate(history)],
              "final_test": final, "test_top1": top1, "best_val": None}
    if best is not None:
        best_test = best if isinstance(best, dict) else {"student": {"top1": best, "top5": 99.0}}
        record["best_val"] = {"epoch": 2, "val_top1": 50.0, "test": best_test,
                              "test_top1": sum(m["top1"] for m in best_test.values()) / len(best_test)}
    if reference:
        record["reference_test"] = {k: {"top1": v, "top5": 99.0} for k, v in reference.items()}
    return record


def write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def heads_outputs(values):
    return {f"head_{i}": {"top1": v, "top5": 99.0} for i, v in enumerate(values, start=1)}


@pytest.fixture
def records(tmp_path):
    """Two folders of hand-written records: res110 -> res8 (every kind of record) and res110 -> res20."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "teacher.json", fake("ce", 30, 72.0, arch="res110", best=72.5, history=[40, 60, 72]))
    write(a / "heads" / "result.json", fake("fine_tune", 30, 0, outputs=heads_outputs([40.0, 55.0, 66.0]),
                                            best=heads_outputs([41.0, 56.0, 65.0])))
    for seed, ce, kd, kd_best in ((30, 60.0, 70.0, 70.5), (50, 61.0, 71.0, 71.5), (67, 62.5, 73.0, 72.0)):
        write(a / f"ce_s{seed}.json", fake("ce", seed, ce, teacher="res8", history=[30, 50, ce]))
        write(a / f"kd_s{seed}.json", fake("kd", seed, kd, best=kd_best, history=[35, 55, kd],
                                           reference={"teacher": 72.0}))
    for seed, dih in ((30, 74.0), (50, 75.0)):
        write(a / f"dih_s{seed}.json", fake("dih", seed, dih, history=[36, 58, dih]))
    write(a / "dih_s67.json", fake("dih", 67, 99.0, complete=False, history=[37]))
    write(a / "fitnets_s30.json", fake("fitnets", 30, 10.0, phase="fitnets_1"))
    write(a / "fitnets_s30_final.json", fake("fitnets", 30, 68.0, phase="fitnets_2"))
    write(a / "takd_s30_ta_res20.json", fake("takd", 30, 65.0, phase="takd_ta", arch="res20"))
    write(a / "takd_s30.json", fake("takd", 30, 69.0))
    torch.save({"format": "x", "kind": "run-state", "phase": "at", "epoch": 2, "batch": 0, "seed": 50,
                "args": {"training_type": "at", "dataset": "synthetic", "teacher": "res110", "student": "res8"}},
               a / "at_s50.state.pth")
    write(a / "pipeline.json", {"kind": report.MANIFEST_KIND, "dataset": "synthetic", "teacher": "res110",
                                "student": "res8", "steps": []})
    # Another pair, with KD at two alphas (separate rows), and a pair on another dataset whose teacher and
    # heads are only known from the DIH students' frozen references (two students, one checkpoint).
    write(b / "kd_a1.json", fake("kd", 30, 66.0, student="res20", kd_alpha=0.1, history=[50, 66]))
    write(b / "kd_a5.json", fake("kd", 30, 67.0, student="res20", kd_alpha=0.5, history=[52, 67]))
    for seed in (1, 2):
        write(b / f"dih_{seed}.json", fake("dih", seed, 80.0 + seed, dataset="cifar10", history=[70, 80 + seed],
                                           saved_path="t.pth",
                                           saved_intermediates_directory="h",
                                           reference={"teacher": 90.0, "head_1": 50.0, "head_2": 70.0}))
    return a, b


def markdown_rows(text, section):
    """{row label: [cells]} of the Markdown table under the heading that ends with ``section``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and line.endswith(section))
    rows = {}
    for line in lines[start + 4:]:  # after the blank line, the header and the rule
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def mean_std(values):
    """By hand: the mean and the sample standard deviation (n - 1)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cell(values):
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})"


def test_report_table_by_hand(records, tmp_path, capsys):
    a, b = records
    out = tmp_path / "docs" / "table"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    text = (tmp_path / "docs" / "table.md").read_text()
    assert capsys.readouterr().out.startswith(text)
    header = next(line for line in text.splitlines() if line.startswith("| |"))
    assert header == "| | cifar10: res110 → res8 | synthetic: res110 → res20 | synthetic: res110 → res8 |"
    last, best = markdown_rows(text, "last epoch"), markdown_rows(text, "best-validation epoch")
    col = 2  # synthetic: res110 -> res8
    assert last["teacher"][col] == "72.00 (n=1)" and best["teacher"][col] == "72.50 (n=1)"
    assert [last[f"head {i}"][col] for i in (1, 2, 3)] == ["40.00 (n=1)", "55.00 (n=1)", "66.00 (n=1)"]
    assert [best[f"head {i}"][col] for i in (1, 2, 3)] == ["41.00 (n=1)", "56.00 (n=1)", "65.00 (n=1)"]
    assert last["ce (student alone)"][col] == cell([60.0, 61.0, 62.5])
    assert last["kd"][col] == cell([70.0, 71.0, 73.0]) == "71.33 ± 1.53 (n=3)"
    assert best["kd"][col] == cell([70.5, 71.5, 72.0]) and "dih" not in best  # no run of dih had validation
    assert last["dih"][col] == cell([74.0, 75.0])  # the incomplete seed 67 (99.0) is not averaged
    assert last["fitnets"][col] == "68.00 (n=1)" and last["takd"][col] == "69.00 (n=1)"  # final phases only
    assert last["kd [kd_alpha=0.1]"][1] == "66.00 (n=1)" and last["kd [kd_alpha=0.5]"][1] == "67.00 (n=1)"
    assert last["teacher"][1] == "72.00 (n=1)"  # the same res110 teacher record serves both synthetic pairs
    assert last["teacher (frozen)"][0] == "90.00 (n=1)" and last["head 2 (frozen)"][0] == "70.00 (n=1)"
    assert last["dih"][0] == cell([81.0, 82.0])
    order = list(last)
    assert order[:5] == ["teacher", "teacher (frozen)", "head 1", "head 1 (frozen)", "head 2"]
    assert order.index("ce (student alone)") < order.index("kd") < order.index("dih") < order.index("fitnets")
    assert "dih res8 on synthetic, seed 67: 1 epoch(s) recorded, complete: false" in text
    assert "at res8 on synthetic, seed 50: stopped after 2 epoch(s)" in text
    assert "fitnets_1 ×1, takd_ta ×1" in text
    assert "sample standard deviation" in text and "Last epoch" in text
    assert "synthetic: res110 → res8 — teacher: 30; head 1: 30; head 2: 30; head 3: 30; ce (student alone): 30 50 67" in text

    rows = list(csv.DictReader((tmp_path / "docs" / "table.csv").open()))
    kd = next(r for r in rows if (r["student"], r["row"], r["selection"]) == ("res8", "kd", "last_epoch"))
    mean, std = mean_std([70.0, 71.0, 73.0])
    assert (float(kd["mean"]), float(kd["std"]), kd["n"], kd["seeds"]) == (pytest.approx(mean, abs=1e-4),
                                                                          pytest.approx(std, abs=1e-4), "3", "30 50 67")
    assert kd["values"] == "70.0000 71.0000 73.0000"
    best_kd = next(r for r in rows if (r["student"], r["row"], r["selection"]) == ("res8", "kd", "best_val"))
    assert float(best_kd["mean"]) == pytest.approx(sum([70.5, 71.5, 72.0]) / 3, abs=1e-4)
    single = next(r for r in rows if (r["student"], r["row"]) == ("res8", "fitnets"))
    assert single["std"] == "" and single["n"] == "1"
    assert not any(r["row"] == "dih" and "99" in r["values"] for r in rows)


def test_report_against_a_row_judges_differences_by_the_seed_spread(records, tmp_path, capsys):
    a, b = records
    assert report.main([str(a), str(b), "--out", str(tmp_path / "t"), "--against", "kd"]) == 0
    text = (tmp_path / "t.md").read_text()
    assert capsys.readouterr().out.startswith(text)
    section = text[text.index("## Differences from kd"):]
    assert "synthetic: res110 → res8; kd: 71.33 ± 1.53 (n=3)" in section
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in section.splitlines()
                                              if line.startswith("| ") and not line.startswith("| row"))}
    (kd_mean, kd_std), (dih_mean, dih_std) = mean_std([70.0, 71.0, 73.0]), mean_std([74.0, 75.0])
    # Welch by hand: t = difference / sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite degrees of freedom.
    v1, v2 = dih_std ** 2 / 2, kd_std ** 2 / 3
    t, df = (dih_mean - kd_mean) / math.sqrt(v1 + v2), (v1 + v2) ** 2 / (v1 ** 2 / 1 + v2 ** 2 / 2)
    assert dih_mean - kd_mean > dih_std + kd_std  # 3.17 > 0.71 + 1.53: the intervals do not overlap
    assert rows["dih"] == [f"{dih_mean:.2f} (n=2)", f"+{dih_mean - kd_mean:.2f}", f"{dih_std:.2f}", "**beyond**",
                           f"+{t:.2f} ({df:.1f})"]
    assert rows["fitnets"][3:] == ["not judged (n=1)", "-"]
    assert "kd" not in rows and "teacher" not in rows
    # Columns without a kd row (cifar10) get no comparison; overlapping intervals are "within".
    assert "cifar10: res110 → res8" not in section
    assert report_compare.beyond_spread([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) is False
    assert report.main([str(a), "--out", str(tmp_path / "u"), "--against", "kd2"]) == 2
    assert "error: --against 'kd2' names no row of the table; its method rows: 'ce (student alone)', 'kd'" \
        in capsys.readouterr().err


def test_report_rows_are_the_objectives_each_labelled_by_what_differs_within_it(tmp_path):
    variants = [("dih", {}, 60.0), ("dih +LS", {"logit_std": True, "kd_temperature": 2.0}, 61.0),
                ("DIH[DKD] [dkd_warmup=1]", {"cohort_loss": "dkd", "dkd_warmup": 1}, 62.0),
                ("DIH[DKD] [dkd_warmup=20]", {"cohort_loss": "dkd", "dkd_warmup": 20}, 63.0)]
    for i, (_, flags, top1) in enumerate(variants):
        args = {"cohort_loss": "kd", "logit_std": False, "kd_temperature": 5.0, "dkd_warmup": 20, **flags}
        write(tmp_path / "r" / f"dih_{i}.json", fake("dih", 30, top1, **args))
    assert report.main([str(tmp_path / "r"), "--out", str(tmp_path / "t")]) == 0
    rows = markdown_rows((tmp_path / "t.md").read_text(), "last epoch")
    assert [(label, cells[0]) for label, cells in rows.items() if label.lower().startswith("dih")] == \
        [(label, f"{top1:.2f} (n=1)") for label, _, top1 in variants]


def test_report_plots_are_pngs(records, tmp_path):
    a, b = records
    out = tmp_path / "plots" / "r"
    assert report.main([str(a), str(b), "--out", str(out), "--plots"]) == 0
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == ["r_curves_cifar10_res110_res8.png", "r_curves_synthetic_res110_res20.png",
                    "r_curves_synthetic_res110_res8.png", "r_depth_cifar10_res110_res8.png",
                    "r_depth_synthetic_res110_res20.png", "r_depth_synthetic_res110_res8.png"]
    import matplotlib.image
    for name in pngs:
        data = (out.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(out.parent / name).shape
        assert height >= 400 and width >= 600


def writes_in(folder):
    """An audit hook's test: is this ``open`` event one that opens a file in ``folder`` for writing?"""
    def test(args) -> bool:
        path, mode, flags = args
        writing = set(mode or "") & set("wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
        return bool(writing) and isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(str(folder))
    return test


def killed_report(argv, folder, nth: int, delay: float) -> bool:
    """Run ``report.main(argv)`` in a forked child that SIGKILLs itself ``delay`` s after it opens its ``nth``
    file in ``folder`` for writing (a temporary file or a final name: whatever the code opens); True if killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            opened, writes = [0], writes_in(folder)

            def hook(event, args):
                if event == "open" and writes(args):
                    opened[0] += 1
                    if opened[0] == nth:
                        threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signal.SIGKILL)),
                                         daemon=True).start()
            sys.addaudithook(hook)
            with contextlib.redirect_stdout(io.StringIO()):
                report.main(argv)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_report_killed_at_random_moments_never_leaves_a_torn_file_and_reruns_identically(records, tmp_path):
    """20 SIGKILLs, each a random 0-50 ms after report.py opens its markdown, CSV or one of its six plots for
    writing (every one of the 8 files at least twice): every file under a final name is always whole (byte for
    byte what an uninterrupted run writes), and a rerun after the kills writes identical files. Before the
    atomic writer a kill while a plot was drawn left it at 0 bytes, and one while report.md was written, torn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once here, not in every forked child)
    inputs = [str(folder) for folder in records]
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([*inputs, "--out", str(tmp_path / "ref" / "r"), "--plots"]) == 0
    reference = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    assert len(reference) == 8
    out = tmp_path / "killed"
    out.mkdir()
    draw, kills = random.Random(31), []
    for i in range(20):
        nth, delay = i % len(reference) + 1, draw.uniform(0, 0.05)
        killed = killed_report([*inputs, "--out", str(out / "r"), "--plots"], out, nth, delay)
        final = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
        torn = [name for name, data in final.items() if data != reference[name]]
        assert not torn, f"kill {i + 1} (write {nth}, {delay * 1000:.0f} ms) left torn files {torn}"
        kills.append(killed)
    assert sum(kills) >= 15, f"only {sum(kills)} of 20 children were killed before they finished"
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([*inputs, "--out", str(out / "r"), "--plots"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == reference


def test_report_user_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run folder '{tmp_path / 'missing'}' does not exist or is not a folder",
                   f"error: no result files under {tmp_path / 'empty'}"]


# ----------------------------------------------------------------------------- the scripts

def script_lines(script, tmp_path, **env):
    """The lines the script prints with ``PYTHON=echo``: headers and the commands it would run, split."""
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "out"), **env}
    done = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def console_commands(lines):
    """The parsed and validated arguments of every ``final_test.py`` line."""
    parser = final_test.build_parser()
    commands = [parser.parse_args(line[1:]) for line in lines if line[0] == "final_test.py"]
    for args in commands:
        final_test.validate(args, parser)
    return commands


def test_sweep_script_prints_a_header_before_each_step(tmp_path):
    lines = script_lines("sweep_cifar100_res110_res8.sh", tmp_path)
    headers, commands = lines[0::2], lines[1::2]
    methods = [t.name for t in ordered() if t.in_pipeline]
    total = len(methods) + 3  # the teacher, its heads, every method, the report
    assert len(headers) == len(commands) == total and all(h[0] == "==" for h in headers)
    assert [h[1] for h in headers] == [f"[{i}/{total}]" for i in range(1, total + 1)]
    assert [" ".join(h[2:]) for h in headers[:5]] == ["teacher res110 seed 30", "heads seed 30",
                                                      "ce (student alone) seeds 30 50 67", "kd seeds 30 50 67",
                                                      "dih seeds 30 50 67"]
    assert [c[0] for c in commands] == ["final_test.py"] * (total - 1) + ["report.py"]
    report.build_parser().parse_args(commands[-1][1:])
    assert [args.training_type for args in console_commands(commands)] == ["ce", "fine_tune", *methods]


@pytest.mark.parametrize("script", ["sweep_cifar100_res110_res8.sh", "pipeline_cifar100_res110_res8.sh"])
def test_scripts_default_to_the_recipe(script, tmp_path):
    for args in console_commands(script_lines(script, tmp_path)):
        assert (args.dataset, args.data_dir, args.epochs, args.epochs_fitnets_1) == ("cifar100", "./data", 200, 40)
        # Each method's own distillation weights apply (TOFD's differ from KD's).
        assert args.kd_alpha is None and args.kd_temperature is None and args.gpu_id is None
        assert args.schedule is None and final_test.make_settings(args).optim.milestones == (60, 120, 180)
        assert args.path_to_save.startswith(str(tmp_path))


@pytest.mark.parametrize("script", ["sweep_cifar100_res110_res8.sh", "pipeline_cifar100_res110_res8.sh"])
def test_every_script_knob_reaches_every_command(script, tmp_path):
    knobs = {"DATASET": "cifar10", "DATA_DIR": str(tmp_path / "data"), "EPOCHS": "1", "TRAIN_SUBSET": "500",
             "VAL_SIZE": "100", "SEEDS": "7", "GPU": "cpu", "TEACHER": "res20", "STUDENT": "res14", "TA": "res14"}
    commands = console_commands(script_lines(script, tmp_path, **knobs))
    methods = [t.name for t in ordered() if t.in_pipeline]
    assert len(commands) == (1 if script.startswith("pipeline") else len(methods) + 2)
    if script.startswith("pipeline"):
        assert commands[0].methods == methods  # the script's default: every method
    for args in commands:
        assert (args.dataset, args.data_dir, args.epochs, args.train_subset, args.val_size, args.seed,
                args.gpu_id, args.ta) == ("cifar10", str(tmp_path / "data"), 1, 500, 100, [7], "cpu", "res14")
        assert args.epochs_fitnets_1 == 1 and args.schedule is None  # FitNets' stage 1 shrinks with EPOCHS
        assert args.student == "res14" and args.teacher in ("res20", "res14")  # ce of the student: --teacher res14
    for args in console_commands(script_lines(script, tmp_path, EPOCHS="10", SCHEDULE="4 8")):
        assert (args.epochs_fitnets_1, args.schedule) == (2, [4, 8])
