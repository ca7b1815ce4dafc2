"""The README's demo section, written from the figures of one demo run (``docs/demo.json``).

``render`` turns the figures into Markdown: the command, the thread count, the machine, the wall time, the
table as the report prints it, and a reading whose every sentence is computed from those numbers, so it
stays true when they change. ``write_section`` replaces the text between the README's two markers.
"""
import itertools
import math
import textwrap
from pathlib import Path

from dihkit.files.atomic_files import atomic_write_text
from dihkit.foundations.errors import UserError
from dihkit.results.report_compare import beyond_spread
from dihkit.results.report_model import format_cell, summary

ROOT = Path(__file__).resolve().parents[1]
README, FIGURES = ROOT / "README.md", ROOT / "docs" / "demo.json"
BEGIN = "<!-- demo section: written by `python3 scripts/demo.py --readme` from docs/demo.json; edit the script -->"
END = "<!-- end of the demo section -->"
ALONE = "ce"   # the student trained alone, the reference of every method row
SPREAD = {True: "beyond the seed spread (the intervals mean ± std do not overlap)", False: "within the seed spread",
          None: "a single run: no spread to judge"}
WIDTH = 110   # the README's line length


def mean(row: dict) -> float:
    """The row's mean last-epoch test top-1."""
    return summary(row["values"])[0]


def versus(a: dict, b: dict) -> str:
    """``kd ends 2.55 points below ce (student alone), within the spread across seeds``."""
    diff = mean(a) - mean(b)
    side = "above" if diff > 0 else "below" if diff < 0 else "level with"
    return (f"{a['label']} ends {abs(diff):.2f} points {side} {b['label']}, "
            f"{SPREAD[beyond_spread(a['values'], b['values'])]}")


def heads_sentence(heads: list, teacher: dict | None) -> str:
    """Whether accuracy grows with the heads' depth, and where the deepest head stands against the teacher."""
    means = [mean(h) for h in heads]
    grows = all(x < y for x, y in zip(means, means[1:]))
    text = f"The heads reach {' / '.join(f'{m:.2f}' for m in means)}: " + (
        "each deeper head is more accurate" if grows else "accuracy does not grow with every deeper head")
    if teacher is not None:
        gap = mean(teacher) - means[-1]
        text += f", and the deepest is {abs(gap):.2f} points {'below' if gap >= 0 else 'above'} the teacher"
    return text + "."


def loss_sentences(figures: dict, heads: int) -> list:
    """The largest change of any run's training loss between its last two epochs, and the heads' last loss."""
    changes = {name: abs(x[-1] - x[-2]) / abs(x[-2]) for name, x in figures["losses"].items() if len(x) > 1}
    out = []
    if changes:
        worst = max(changes, key=changes.get)
        out.append(f"Between its last two epochs every run's training loss changed by {100 * changes[worst]:.1f}% "
                   f"at most (`{worst}`).")
    tuned = [x for name, x in figures["losses"].items() if name.startswith("heads/")]
    if tuned and heads:
        out.append(f"The heads' summed training cross-entropy ended at {tuned[0][-1]:.1f}; {heads} uniform "
                   f"guesses over {figures['classes']} classes would score {heads * math.log(figures['classes']):.1f}.")
    return out


def reading(figures: dict) -> list:
    """Sentences about the table, each computed from its numbers."""
    rows = figures["rows"]
    by_kind = {r["kind"]: r for r in rows}
    heads = [r for r in rows if r["kind"] == "head"]
    alone = by_kind.get(ALONE)
    methods = [r for r in rows if r["kind"] not in ("teacher", "head", ALONE)]
    out = []
    if "teacher" in by_kind and alone:
        out.append(f"The {versus(by_kind['teacher'], alone)}.")
    if heads:
        out.append(heads_sentence(heads, by_kind.get("teacher")))
    out += [f"{versus(m, alone)}." for m in methods if alone]
    out += [f"{versus(b, a)}." for a, b in itertools.combinations(methods, 2)]
    return out + loss_sentences(figures, len(heads))


def render(figures: dict) -> str:
    """The demo section's Markdown, markers included."""
    load = figures["load"]
    table = [f"| | {figures['column']} |", "|---|---|"]
    table += [f"| {r['label']} | {format_cell(r['values'])} |" for r in figures["rows"]]
    threads = f"{figures['threads']} thread" + ("s" if figures["threads"] > 1 else "")
    intro = (f"It sets PyTorch to {threads}, whatever `OMP_NUM_THREADS` says: the numbers change with the thread "
             f"count. On a {figures['cores']}-core CPU (load average {load[0]} to {load[-1]}) it took "
             f"{figures['seconds']} s and printed (test top-1 %, last epoch, mean ± std over the seeds):")
    return "\n".join([BEGIN, "", f"    {figures['command']}", "", fill(intro), "", *table, "",
                      fill(" ".join(reading(figures))), "", END])


def fill(text: str) -> str:
    """``text`` wrapped to the README's width, never inside a word."""
    return textwrap.fill(text, WIDTH, break_on_hyphens=False)


def write_section(path: Path, section: str) -> None:
    """Replace the README's demo section (from ``BEGIN`` to ``END``) with ``section``."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise UserError(f"{path} has no demo section: put the two marker lines of scripts/demo_readme.py there")
    atomic_write_text(path, text[:start] + section + text[end + len(END):])


def section_of(path: Path) -> str:
    """The README's current demo section, markers included (empty when it has none)."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if 0 <= start < end else ""
