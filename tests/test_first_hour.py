"""A newcomer's first hour, round 2: the demo's figures trace to their result files and its sections are what it
writes, the README's four commands run short, a small image folder trains by the documented recipe, and the console
forgives and explains."""
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import pytest

import dataload
import final_test
import report
from dihkit.console.console_flags import resolve_teacher
from dihkit.foundations.errors import UserError
from dihkit.foundations.registry import REGISTRY
from dihkit.results.report_compare import beyond_spread
from console import ROOT, TINY, data_loaded_once, run_inprocess
from test_dataload import write_image
from test_results import fake, write


def script(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO = ROOT / "docs" / "demo"


def refused(argv, capsys) -> str:
    """The one line a refused command prints (exit code 2)."""
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ----------------------------------------------------------------------------- the demo's figures and sections

VARIANTS = ("synthetic", "cifar10")


def published(variant: str) -> tuple:
    """The demo's published figures of ``variant`` and the folder of result files they come from."""
    return json.loads((DEMO / f"{variant}.json").read_text(encoding="utf-8")), DEMO / variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_demos_figures_recompute_from_the_result_files_whose_digests_they_hold(variant):
    demo = script("demo")
    figures, folder = published(variant)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json"))
    assert sorted(figures["digests"]) == files and {"pipeline.json", demo.TIMING, "teacher.json"} <= set(files)
    assert all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
               for name, digest in figures["digests"].items()), "a result file differs from its recorded digest"
    # Every figure is what the files give: a figure edited by hand differs from the recomputed one.
    assert demo.figures(folder) == figures, f"docs/demo/{variant}.json is not what its files give: run the demo"
    # The figures are of the demo's current command (the data flags aside) and setting.
    spec = {"synthetic": demo.SYNTHETIC, "cifar10": demo.CIFAR10}[variant]
    assert shlex.join(demo.SETTING) in figures["command"] and shlex.join(spec.flags) in figures["command"]
    assert all(f"{k}={v}" in figures["command"] for k, v in spec.pinned.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_demo_sections_of_the_readme_and_docs_are_what_the_demo_writes(variant):
    readme = script("demo_readme")
    figures, _ = published(variant)
    assert readme.section_of(readme.README, variant) == readme.render_summary(figures), \
        f"README.md's demo section for {variant} is stale: run the demo with --readme"
    assert readme.section_of(readme.PAGE, variant) == readme.render_detail(figures), \
        f"docs/DEMO.md's demo section for {variant} is stale: run the demo with --readme"


def test_the_demos_distillation_separates_from_the_student_alone():
    """The point of the generated demo's setting: KD above the student alone beyond the seed spread (3 seeds)."""
    rows = {r["kind"]: r["values"] for r in published("synthetic")[0]["rows"]}
    assert len(rows["ce"]) == len(rows["kd"]) == 3
    assert beyond_spread(rows["kd"], rows["ce"]) and statistics.fmean(rows["kd"]) > statistics.fmean(rows["ce"])


@pytest.mark.slow
def test_the_demo_runs_and_publishes_figures_that_recompute_from_its_files(tmp_path, monkeypatch, capsys):
    demo = script("demo")
    readme = sys.modules["demo_readme"]   # the module demo.py writes the sections with
    tiny = ("--train_subset", "100", "--teacher_train_subset", "200", "--epochs", "1", "--schedule", "1",
            "--teacher_epochs", "1", "--teacher_schedule", "1", "--gpu_id", "cpu", "--precision", "fp32",
            "--memory_format", "contiguous")
    monkeypatch.setattr(demo, "SYNTHETIC", demo.Variant("synthetic", tiny, demo.PINNED))
    for page in ("README.md", "DEMO.md"):
        shutil.copyfile(readme.README if page == "README.md" else readme.PAGE, tmp_path / page)
    monkeypatch.setattr(readme, "README", tmp_path / "README.md")
    monkeypatch.setattr(readme, "PAGE", tmp_path / "DEMO.md")
    monkeypatch.setattr(demo, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    assert demo.main(["--readme"]) == 0, capsys.readouterr().err
    assert dict(os.environ) == before   # the pins reached the workers only
    figures = json.loads((tmp_path / "docs" / "demo" / "synthetic.json").read_text())
    assert demo.figures(tmp_path / "docs" / "demo" / "synthetic") == figures
    assert figures["command"].startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2 ")
    assert figures["seconds"] > 0 and figures["cpu_seconds"] > 0 and len(figures["load"]) == 3
    assert [r["kind"] for r in figures["rows"]] == ["teacher", "head", "head", "head", "ce", "kd", "dih"]
    assert all(len(r["values"]) == 3 for r in figures["rows"][4:])
    assert readme.section_of(tmp_path / "README.md", "synthetic") == readme.render_summary(figures)
    assert readme.section_of(tmp_path / "DEMO.md", "synthetic") == readme.render_detail(figures)
    assert "demo: " in capsys.readouterr().out


def test_an_edited_figure_or_result_file_is_caught(tmp_path):
    demo = script("demo")
    figures, folder = published("synthetic")
    copy = tmp_path / "synthetic"
    shutil.copytree(folder, copy)
    edited = json.loads(json.dumps(figures))
    edited["rows"][-1]["values"][0] += 0.1
    assert demo.figures(copy) == figures and demo.figures(copy) != edited
    result = copy / "kd_s30.json"
    record = json.loads(result.read_text())
    record["test_top1"] += 1   # the figure the report reads
    record["final_test"] = {k: {**m, "top1": m["top1"] + 1} for k, m in record["final_test"].items()}
    result.write_text(json.dumps(record, indent=2))
    again = demo.figures(copy)
    assert again["digests"]["kd_s30.json"] != figures["digests"]["kd_s30.json"] and again["rows"] != figures["rows"]


def figures(kd, dih, heads=(50.0, 60.0, 70.0)):
    """Demo figures with the student alone at 60 ± 1 and the given per-seed values of kd and dih."""
    rows = [{"label": "teacher", "kind": "teacher", "values": [80.0]}]
    rows += [{"label": f"head {i}", "kind": "head", "values": [v]} for i, v in enumerate(heads, start=1)]
    rows += [{"label": "ce (student alone)", "kind": "ce", "values": [59.0, 61.0]},
             {"label": "kd", "kind": "kd", "values": list(kd)}, {"label": "dih", "kind": "dih", "values": list(dih)}]
    return {"variant": "synthetic", "command": "python3 final_test.py", "cores": 2, "cpu": "a CPU",
            "load": [1.0, 2.5, 2.0], "seconds": 100, "cpu_seconds": 190, "device": "cpu", "precision": "fp32",
            "column": "synthetic: res14 → res8", "classes": 10, "rows": rows,
            "losses": {"heads/result.json": [200.0, 150.0, 100.0], "kd_s30.json": [1.0, 0.9, 0.99]}}


def test_the_demos_reading_is_computed_from_its_numbers():
    reading = script("demo_readme").reading
    text = " ".join(reading(figures(kd=[55.0, 55.2], dih=[60.5, 61.5])))
    assert "The teacher ends 20.00 points above ce (student alone)" in text
    assert "kd ends 4.90 points below ce (student alone), beyond the seed spread" in text
    assert "dih ends 1.00 points above ce (student alone), within the seed spread" in text
    assert "dih ends 5.90 points above kd, beyond" in text
    assert "each deeper head is more accurate, and the deepest is 10.00 points below the teacher" in text
    # The largest change between the last two epochs: the heads' 150 -> 100; 3 uniform guesses: 3 ln 10.
    assert "changed by 33.3% at most (`heads/result.json`)" in text and "would score 6.9" in text
    text = " ".join(reading(figures(kd=[61.0, 63.0], dih=[50.0], heads=(70.0, 60.0, 65.0))))
    assert "kd ends 2.00 points above ce (student alone), within" in text
    assert "dih ends 10.00 points below ce (student alone), a single run: no spread to judge" in text
    assert "accuracy does not grow with every deeper head" in text
    summary = script("demo_readme").render_summary(figures(kd=[55.0, 55.2], dih=[60.5, 61.5]))
    assert "It took 100 s (190 s of CPU) on 2 cores of a CPU (cpu, fp32), load average 1.0 at the " \
           "start, 2.5 at most, 2.0 at the end" in " ".join(summary.split())
    assert "| kd | 55.10 ± 0.14 (n=2) |" in summary


def test_the_demo_section_is_replaced_between_its_markers_only(tmp_path):
    readme = script("demo_readme")
    begin, end = readme.markers("synthetic")
    page = tmp_path / "README.md"
    page.write_text(f"before\n{begin}\nold\n{end}\nafter\n", encoding="utf-8")
    readme.write_section(page, "synthetic", f"{begin}\nnew\n{end}")
    assert page.read_text(encoding="utf-8") == f"before\n{begin}\nnew\n{end}\nafter\n"
    with pytest.raises(UserError, match="has no demo section for cifar10"):
        readme.write_section(page, "cifar10", "x")


def test_the_real_data_demo_holds_out_a_test_split_of_a_train_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        for i in range(10):
            write_image(tmp_path / "jpeg" / "train" / f"class_{c}" / f"{i}.png", colour)
    demo = script("demo")
    flags = demo.real_data(str(tmp_path / "jpeg"))
    assert flags == ("--dataset", "imagefolder", "--data_dir", str(Path("demo_runs") / "cifar10_split"))
    split = tmp_path / flags[-1]
    assert [len(list((split / part / f"class_{c}").iterdir())) for part in ("train", "test") for c in range(3)] \
        == [8, 8, 8, 2, 2, 2]   # a fifth of the smallest class held out, as scripts/split_imagefolder.py does
    made = (split / "source.txt").stat().st_mtime_ns
    assert demo.real_data(str(tmp_path / "jpeg")) == flags and (split / "source.txt").stat().st_mtime_ns == made
    # A folder with train/ and test/ is read as it is; the project's tarball must be extracted first.
    assert demo.real_data(str(split)) == ("--dataset", "imagefolder", "--data_dir", str(split))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10-train-jpeg.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="holds cifar10-train-jpeg.tar.gz: extract it first"):
        demo.real_data(str(tmp_path / "data"))
    assert demo.real_data(None) == ("--dataset", "cifar10")


# ----------------------------------------------------------------------------- the four commands, short

def four_commands() -> list:
    """The README's four commands, as argument lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The method in four commands"):text.index("## Training types")]
    return [shlex.split(line)[2:] for line in section.splitlines() if line.startswith("    python3 final_test.py")]


def test_the_four_commands_run_with_a_short_epochs_and_end_by_testing_the_student(tmp_path, capsys):
    commands = four_commands()
    assert [c[c.index("--training_type") + 1] for c in commands] == ["ce", "fine_tune", "dih", "test"]
    assert commands[-1][commands[-1].index("--saved_path") + 1] == "runs/dih_model.pth"
    # The documented change (--epochs 2, here 1), and what keeps a test small: a CPU, generated data, res8.
    swap = {"200": "1", "cifar100": "synthetic", "cuda:0": "cpu", "res110": "res8"}
    with data_loaded_once(test_images=100):
        for argv in commands:
            argv = [swap.get(w, w).replace("runs/", f"{tmp_path}/") for w in argv]
            assert run_inprocess([*argv, "--train_subset", "200"]) == 0, capsys.readouterr().err
    assert re.search(r"^res8 +\d", capsys.readouterr().out, re.M)  # test's table row of the student (res8)


def test_a_milestone_beyond_the_epochs_says_to_leave_the_schedule_out(capsys):
    err = refused(["--epochs", "2", "--schedule", "60", "120", "180"], capsys)
    assert "milestone 60 is outside 1..2" in err and "leave --schedule out for milestones at 30%, 60%, 90%" in err


# ----------------------------------------------------------------------------- the teacher, read from its file

def settings(*argv):
    """The console's settings for ``argv`` (on the tiny recipe)."""
    return final_test.make_settings(final_test.build_parser().parse_args([str(a) for a in [*TINY, *argv]]))


def test_a_distillation_type_reads_the_teachers_architecture_from_its_file(tiny_teacher, capsys):
    untyped = [w for w in TINY if w not in ("--teacher", "res14")]
    for training_type in ("kd", "dih", "fine_tune", "at", "pipeline"):
        args = final_test.build_parser().parse_args(
            [*untyped, "--training_type", training_type, "--saved_path", str(tiny_teacher / "teacher.pth")])
        resolve_teacher(args)
        assert args.teacher == "res14", training_type  # the file's, not the default res110
    # Without a file to read, the default; a type that trains the teacher keeps it.
    assert final_test.make_settings(final_test.build_parser().parse_args(["--training_type", "kd"])).models.teacher \
        == "res110"
    assert final_test.make_settings(final_test.build_parser().parse_args(
        ["--training_type", "ce", "--saved_path", str(tiny_teacher / "teacher.pth")])).models.teacher == "res110"
    # A contradiction the user typed is refused, before any data.
    err = refused([*TINY, "--training_type", "kd", "--teacher", "res20", "--saved_path", tiny_teacher / "teacher.pth"],
                  capsys)
    assert "holds a res14, not the requested res20" in err


def test_the_help_states_the_teachers_default_and_where_it_comes_from():
    action = next(a for a in final_test.build_parser()._actions if a.dest == "teacher")
    text = final_test.build_parser()._get_formatter()._expand_help(action)
    assert "takes the architecture that file records" in text and text.endswith("(default: res110)")


# ----------------------------------------------------------------------------- checks before data

@pytest.fixture
def no_data(monkeypatch):
    """Reading any dataset fails the test: the command must be refused before."""
    def load_data(*args, **kwargs):
        raise AssertionError("the data was read before the command was refused")
    monkeypatch.setattr(dataload, "load_data", load_data)


@pytest.mark.parametrize("extra, message", [
    (["--training_type", "kd", "--saved_path", "nope.pth"], "teacher checkpoint 'nope.pth' does not exist"),
    (["--training_type", "kd", "--teacher", "res14", "--saved_path", "nope.pth"], "'nope.pth' does not exist"),
    (["--training_type", "dih", "--saved_path", "TEACHER"], "dih needs --saved_intermediates_directory"),
    (["--training_type", "dih", "--saved_path", "TEACHER", "--saved_intermediates_directory", "nope"],
     "heads directory 'nope' does not exist"),
    (["--training_type", "test"], "test needs --saved_path"),
])
def test_checks_that_need_no_data_come_before_the_data(tiny_teacher, no_data, tmp_path, capsys, extra, message):
    extra = [str(tiny_teacher / "teacher.pth") if w == "TEACHER" else w for w in extra]
    assert message in refused([*TINY, *extra, "--path_to_save", tmp_path / "out.pth"], capsys)


# What a training type's own check (``pre_data_check``) refuses from the flags alone, and what its record's
# ``needs`` implies (a teacher), each before any data: (case id, flags, words of the message).
TYPE_CHECKS = [
    # res20 and res8 hold 278,324 and 83,892 parameters with 100 classes, of which 64 x 100 + 100 classify.
    ("takd_assistant_larger", ["--training_type", "takd", "--teacher", "res8", "--ta", "res20"],
     "--ta res20 (271,824 parameters before the classifier) is larger than the teacher res8 (77,392)"),
    ("takd_assistant_smaller", ["--training_type", "takd", "--student", "res14", "--ta", "res8"],
     "is smaller than the student res14"),
    ("fitnets_hint_layer", ["--training_type", "fitnets", "--teacher", "res8", "--hint_layer", "3"],
     "--hint_layer 3 does not exist: res8 has 3 stages"),
    ("fitnets_guided_layer", ["--training_type", "fitnets", "--guided_layer", "4"], "--guided_layer 4 does not exist"),
    ("fitnets_stage1_schedule", ["--training_type", "fitnets", "--epochs_fitnets_1", "2", "--schedule_fitnets_1", "3"],
     "--schedule_fitnets_1 milestones must lie in 1..2"),
    ("at_stage_counts", ["--training_type", "at", "--student", "res18"], "has 3 stages and --student res18 has 4"),
    ("tofd_stage_counts", ["--training_type", "tofd", "--teacher", "res18"], "has 4 stages and --student res8 has 3"),
    ("mhkd_stage_counts", ["--training_type", "mhkd", "--teacher", "vgg11"], "has 4 stages and --student res8 has 3"),
    ("fine_tune_selection_without_validation", ["--training_type", "fine_tune", "--head_selection", "lowest_val_loss"],
     "give --val_size"),
] + [(f"{name}_without_teacher", ["--training_type", name, "--teacher", "res110"],
       f"{name} needs --saved_path (the trained res110 teacher")
     for name, t in sorted(REGISTRY.items()) if "teacher" in t.needs]


@pytest.mark.parametrize("case, extra, message", TYPE_CHECKS, ids=[c[0] for c in TYPE_CHECKS])
def test_a_training_types_own_checks_come_before_the_data(no_data, tmp_path, capsys, case, extra, message):
    assert message in refused([*TINY, "--epochs", "2", *extra, "--path_to_save", tmp_path / "out" / "m.pth"], capsys)
    assert not (tmp_path / "out").exists()


def test_takd_given_a_trained_assistant_needs_no_teacher():
    takd = REGISTRY["takd"]
    assert takd.needed({"saved_ta_path": "ta.pth"}) == frozenset() and takd.needed({}) == {"teacher"}


# ----------------------------------------------------------------------------- mistyped flags, --help

def test_a_mistyped_flag_gets_the_closest_flags(capsys):
    err = refused(["--temprature", "5"], capsys)
    assert "unrecognized arguments: --temprature 5; did you mean --temperature?" in err
    err = refused(["--lrr", "1", "--epoch_s", "2"], capsys)
    assert "; for --lrr, did you mean --lr" in err and "; for --epoch_s, did you mean --epochs" in err
    assert refused(["--zzzzzz", "1"], capsys).endswith("unrecognized arguments: --zzzzzz 1")


def test_a_mistyped_choice_gets_the_closest_choices(capsys):
    assert refused(["--recipe", "dkdd"], capsys).endswith(
        "invalid choice: 'dkdd' (choose from 'dih', 'dih_code', 'crd', 'dkd', 'dist_cifar', 'dist_imagenet', 'ls', "
        "'mdistiller_imagenet', 'torchdistill_imagenet'); did you mean dkd?")
    assert refused(["--student", "res88"], capsys).endswith("; did you mean res8 or res18?")
    assert refused(["--training_type", "pipeline", "--methods", "kd", "dihh"], capsys).endswith("did you mean dih?")
    assert refused(["--dataset", "mnist"], capsys).endswith("'synthetic')"), "nothing close: no guess"


def test_the_help_opens_with_three_example_commands_that_parse(capsys):
    with pytest.raises(SystemExit):
        final_test.build_parser().parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: final_test.py [--training_type TYPE] [FLAG ...]"
    examples = [line.strip() for line in lines[:lines.index("options:")] if line.startswith("  python3 ")]
    assert len(examples) == 3
    for line in examples:
        final_test.build_parser().parse_args(shlex.split(line)[2:])


# ----------------------------------------------------------------------------- a small image folder

def test_a_small_image_folder_trains_by_the_printed_command(tmp_path, monkeypatch, capsys):
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        for i in range(30):
            write_image(tmp_path / "photos" / f"class_{c}" / f"{i}.png", colour)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert script("split_imagefolder").main(["photos", "my_split"]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 6 test and all remaining train images per class" in out
    command = shlex.split(out.splitlines()[-1])
    assert command[:2] == ["python3", "final_test.py"]
    with data_loaded_once(test_images=None):
        assert run_inprocess(command[2:]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "first.json").read_text())["complete"]


# ----------------------------------------------------------------------------- report.py --against

def test_against_takes_a_training_type_and_shows_the_rows_label(tmp_path, capsys):
    for seed, (ce, kd) in zip((30, 50), ((60.0, 62.0), (61.0, 63.0))):
        write(tmp_path / f"ce_s{seed}.json", fake("ce", seed, ce, teacher="res8"))
        write(tmp_path / f"kd_s{seed}.json", fake("kd", seed, kd))
    assert report.main([str(tmp_path), "--against", "ce"]) == 0
    out = capsys.readouterr().out
    assert "## Differences from ce (student alone)" in out and "| kd | 62.50 (n=2) | +2.00 |" in out
    # A type with several rows and none labelled by its name: the user picks one label.
    for path in tmp_path.glob("kd_*.json"):
        path.unlink()
    write(tmp_path / "kd_a.json", fake("kd", 30, 64.0, logit_std=True))
    write(tmp_path / "kd_b.json", fake("kd", 30, 65.0, logit_std=True, kd_alpha=0.5))
    assert report.main([str(tmp_path), "--against", "kd"]) == 2
    assert ("--against 'kd' names 2 rows: 'kd +LS [kd_alpha=0.1]', 'kd +LS [kd_alpha=0.5]'; give one row's label"
            in capsys.readouterr().err)
