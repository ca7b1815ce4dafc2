"""A newcomer's first hour, round 2: the README's demo section is what the demo writes, its four commands run
short, a small image folder trains by the documented recipe, and the console forgives and explains."""
import importlib.util
import json
import re
import shlex

import pytest

import dataload
import final_test
import report
from dihkit.console.console_flags import resolve_teacher
from dihkit.foundations.errors import UserError
from dihkit.foundations.registry import REGISTRY
from console import ROOT, TINY, data_loaded_once, run_inprocess
from test_dataload import write_image
from test_results import fake, write


def script(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(argv, capsys) -> str:
    """The one line a refused command prints (exit code 2)."""
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ----------------------------------------------------------------------------- the README's demo section

def test_the_readmes_demo_section_is_what_the_current_demo_writes():
    demo = script("demo")
    figures = json.loads(demo.FIGURES.read_text(encoding="utf-8"))
    # The figures are of the demo's current command, and the section is their rendering by the current code.
    assert figures["command"] == "python3 final_test.py " + " ".join(demo.COMMAND)
    assert figures["threads"] == demo.THREADS
    assert script("demo_readme").section_of(ROOT / "README.md") == demo.render(figures), \
        "README.md's demo section is stale: run python3 scripts/demo.py --readme"


def figures(kd, dih, heads=(50.0, 60.0, 70.0)):
    """Demo figures with the student alone at 60 ± 1 and the given per-seed values of kd and dih."""
    rows = [{"label": "teacher", "kind": "teacher", "values": [80.0]}]
    rows += [{"label": f"head {i}", "kind": "head", "values": [v]} for i, v in enumerate(heads, start=1)]
    rows += [{"label": "ce (student alone)", "kind": "ce", "values": [59.0, 61.0]},
             {"label": "kd", "kind": "kd", "values": list(kd)}, {"label": "dih", "kind": "dih", "values": list(dih)}]
    return {"command": "python3 final_test.py", "threads": 1, "cores": 2, "load": [1.0, 2.0], "seconds": 100,
            "column": "synthetic: res20 → res8", "classes": 10, "rows": rows,
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


def test_the_demo_section_is_replaced_between_its_markers_only(tmp_path):
    readme = script("demo_readme")
    page = tmp_path / "README.md"
    page.write_text(f"before\n{readme.BEGIN}\nold\n{readme.END}\nafter\n", encoding="utf-8")
    readme.write_section(page, f"{readme.BEGIN}\nnew\n{readme.END}")
    assert page.read_text(encoding="utf-8") == f"before\n{readme.BEGIN}\nnew\n{readme.END}\nafter\n"
    page.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no demo section"):
        readme.write_section(page, "x")


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
