"""`final_test.py --help` as a newcomer reads it: each default stated once, every flag it names real."""
import re

import pytest

import final_test
import report

FLAG = re.compile(r"--[A-Za-z0-9_]+")


def help_texts(parser):
    """{option string: its help as --help prints it (defaults appended, % expanded)} of every flag."""
    formatter = parser._get_formatter()
    return {a.option_strings[0]: formatter._expand_help(a) if a.help else ""
            for a in parser._actions if a.option_strings}


@pytest.mark.parametrize("build", [final_test.build_parser, report.build_parser])
def test_every_flag_that_takes_a_value_states_its_default_once(build):
    parser = build()
    switches = {a.option_strings[0] for a in parser._actions if a.option_strings and a.nargs == 0}
    texts = help_texts(parser)
    assert len(texts) > len(switches) >= 1
    for option, text in texts.items():
        # A switch is off unless given; anything else states its default exactly once, as "default: ...".
        assert text.count("default:") == (0 if option in switches else 1), f"{option}: {text}"


def test_every_flag_named_in_the_help_exists():
    parser = final_test.build_parser()
    known = {o for a in parser._actions for o in a.option_strings}
    texts = list(help_texts(parser).values()) + [g.description or "" for g in parser._action_groups]
    named = {m for text in texts for m in FLAG.findall(text)}
    assert {"--epochs", "--schedule", "--kd_alpha", "--path_to_save"} <= named
    assert named - known == set()


def test_help_lists_the_shared_groups_then_one_group_per_training_type(capsys):
    with pytest.raises(SystemExit) as done:
        final_test.build_parser().parse_args(["--help"])
    assert done.value.code == 0
    titles = [line[:-1] for line in capsys.readouterr().out.splitlines() if re.fullmatch(r"\S.*:", line)]
    shared = ["options", "run", "data", "optimisation", "distillation", "recipe", "outputs", "speed",
              "multi-GPU (torchrun)", "pipeline"]
    assert titles[:len(shared)] == shared
    assert {"fitnets", "takd", "at", "crd"} <= set(titles[len(shared):])
