"""The documentation stays true: the flag page matches the parser, the README stays short and keeps CI's
test command, every relative link resolves, and every example command parses."""
import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 12_288   # bytes
TEST_COMMAND = "python3 -m pytest -q --runslow"   # what .ci/run runs; it must be the README's command


def load(relpath: str, name: str):
    """Import a repository file that is not in a package (scripts/, bench/)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines) of a Markdown page: code is fenced or indented by 4 spaces after a blank."""
    prose, code = [], []
    fenced = False
    previous_blank_or_code = True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and previous_blank_or_code and not line.lstrip().startswith(("- ", "* "))
        if fenced or (indented and line.strip()):
            code.append(line.strip())
            previous_blank_or_code = True
        else:
            prose.append(line)
            previous_blank_or_code = not line.strip() or (previous_blank_or_code and indented)
    return prose, code


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page (repeated headings get -1, -2, ... as on GitHub), and explicit ids."""
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', line))
    return out


def links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and images, outside code."""
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def test_flags_page_is_current():
    gen_flags = load("scripts/gen_flags.py", "gen_flags")
    assert not gen_flags.is_stale(), "docs/FLAGS.md is stale: run python3 scripts/gen_flags.py"


def test_flags_page_lists_every_flag():
    import final_test
    text = (ROOT / "docs" / "FLAGS.md").read_text(encoding="utf-8")
    for action in final_test.build_parser()._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}`" in text, option


def test_readme_is_short():
    size = README.stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move detail to docs/)"


def test_readme_keeps_the_ci_test_command():
    _, code = split_code(README.read_text(encoding="utf-8"))
    assert TEST_COMMAND in code, f"README.md must show `{TEST_COMMAND}` as a command line (.ci/run runs it)"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci.splitlines()


def test_readme_lists_every_training_type():
    import final_test
    choices = next(a.choices for a in final_test.build_parser()._actions if a.dest == "training_type")
    text = README.read_text(encoding="utf-8")
    missing = [c for c in choices if f"| `{c}` |" not in text]
    assert not missing, f"README.md's table of training types lacks {missing}: add one line each"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + ", ".join(broken)


def example_commands():
    """(page, line, program, argv) of every runnable example command in the README and docs/*.md."""
    programs = ("final_test.py", "CRD/train_student.py", "TOFD/tofd_train.py", "MHKD/mhkd_training.py",
                "report.py", "bench/bench.py")
    found = []
    for page in PAGES:
        _, code = split_code(page.read_text(encoding="utf-8"))
        for line in code:
            if "..." in line:   # an elided example, not a runnable one
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, word in enumerate(words):
                if word in programs and i > 0 and (words[i - 1].startswith("python") or words[0] == "torchrun"):
                    found.append((page.relative_to(ROOT), line, word, words[i + 1:]))
                    break
    return found


def test_example_commands_parse(capsys):
    import final_test
    report = load("report.py", "report_cli")
    bench = load("bench/bench.py", "bench_cli")
    commands = example_commands()
    assert commands, "no example command found"
    bad = []
    for page, line, program, argv in commands:
        try:
            if program == "report.py":
                report.build_parser().parse_args(argv)
            elif program == "bench/bench.py":
                bench.parse_args(argv)
            else:
                final_test.build_parser().parse_args(argv)
        except SystemExit:
            bad.append(f"{page}: {line}\n    {capsys.readouterr().err.strip()}")
    assert not bad, "example commands the console rejects:\n" + "\n".join(bad)


def test_generator_check_mode(tmp_path, capsys):
    gen_flags = load("scripts/gen_flags.py", "gen_flags")
    stale = tmp_path / "FLAGS.md"
    stale.write_text("old\n", encoding="utf-8")
    assert gen_flags.main(["--check"], path=stale) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert stale.read_text(encoding="utf-8") == "old\n"
    assert gen_flags.main([], path=stale) == 0
    assert gen_flags.main(["--check"], path=stale) == 0


def test_generator_reads_any_parser():
    gen_flags = load("scripts/gen_flags.py", "gen_flags")
    p = argparse.ArgumentParser()
    p.add_argument("src", help="a positional")
    p.add_argument("--x", "--ex", type=int, default=3, help="x | y <z> %(default)s")
    g = p.add_argument_group("extra", "a group")
    g.add_argument("--flag", action="store_true")
    g.add_argument("--hidden", help=argparse.SUPPRESS)
    page = gen_flags.render(p)
    assert "| `--x`, `--ex` | `3` | x \\| y &lt;z&gt; 3 |" in page
    assert "## extra" in page and "| `--flag` | off |" in page and "--hidden" not in page
    assert "| `src` | none | a positional |" in page
