"""The demo's sections of README.md and docs/DEMO.md, written from the figures of one demo run
(``docs/demo/<variant>.json``, which ``scripts/demo.py`` computes from the result files beside it).

``render_summary`` gives README's part: the time, the table and the comparisons (for the real-data demo, one
line); ``render_detail`` gives docs/DEMO.md's: the equivalent console command, the machine, the table and every
sentence of the reading. Each sentence is computed from the numbers, so it stays true when they change.
``write_sections`` replaces the text between a section's two markers.
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
DOCS = ROOT / "docs"
README, PAGE = ROOT / "README.md", DOCS / "DEMO.md"
DEMO_FLAGS = {"synthetic": "", "cifar10": " --data_dir DIR"}   # how each variant is run
ALONE = "ce"   # the student trained alone, the reference of every method row
SPREAD = {True: "beyond the seed spread", False: "within the seed spread", None: "a single run: no spread to judge"}
WIDTH = 110   # the pages' line length


def markers(variant: str) -> tuple:
    """The lines that open and close a variant's demo section (the same on both pages)."""
    return (f"<!-- demo {variant}: written by `python3 scripts/demo.py{DEMO_FLAGS[variant]} --readme` from "
            f"docs/demo/{variant}.json; edit the script -->", f"<!-- end of the demo {variant} -->")


def mean(row: dict) -> float:
    """The row's mean last-epoch test top-1."""
    return summary(row["values"])[0]


def versus(a: dict, b: dict) -> str:
    """``kd ends 2.55 points below ce (student alone), within the seed spread``."""
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


def comparisons(rows: list) -> list:
    """The teacher against the student alone, every method against it, and the methods against each other."""
    by_kind = {r["kind"]: r for r in rows}
    alone = by_kind.get(ALONE)
    methods = [r for r in rows if r["kind"] not in ("teacher", "head", ALONE)]
    out = [f"The {versus(by_kind['teacher'], alone)}."] if "teacher" in by_kind and alone else []
    out += [f"{versus(m, alone)}." for m in methods if alone]
    return out + [f"{versus(b, a)}." for a, b in itertools.combinations(methods, 2)]


def reading(figures: dict) -> list:
    """Every sentence about the table, each computed from its numbers."""
    rows = figures["rows"]
    heads = [r for r in rows if r["kind"] == "head"]
    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    return (comparisons(rows) + ([heads_sentence(heads, teacher)] if heads else [])
            + loss_sentences(figures, len(heads)))


def timing_words(figures: dict) -> str:
    """``186 s (341 s of CPU) on 2 cores of AMD EPYC (cpu, fp32), load average 0.1 at the start, 2.1 at most, 2.0
    at the end``: the demo's wall time and the CPU time of all its processes, where, and the machine's load."""
    load = figures["load"]
    where = f"{figures['cores']} cores of {figures['cpu']}"
    where += f" and the GPU {figures['gpu']}" if figures.get("gpu") else ""
    run = f" ({figures['device']}, {figures['precision']})" if "device" in figures else ""
    return (f"{figures['seconds']} s ({figures['cpu_seconds']} s of CPU) on {where}{run}, load average {load[0]} at "
            f"the start, {load[1]} at most, {load[2]} at the end")


def markdown_table(figures: dict) -> list:
    """The table as the report prints it: one row per teacher, head and method."""
    rows = [f"| | {figures['column']} |", "|---|---|"]
    return rows + [f"| {r['label']} | {format_cell(r['values'])} |" for r in figures["rows"]]


def render_summary(figures: dict) -> str:
    """README's section of the variant: the time, table and comparisons; for the real-data demo one line."""
    begin, end = markers(figures["variant"])
    if figures["variant"] != "synthetic":
        alone, kd = (next(r for r in figures["rows"] if r["kind"] == k) for k in (ALONE, "kd"))
        line = (f"Measured: {timing_words(figures)}; {versus(kd, alone)} ([the table](docs/DEMO.md#on-real-cifar-10)).")
        return "\n".join([begin, fill(line), end])
    intro = f"It took {timing_words(figures)}, and printed (test top-1 %, last epoch, mean ± std over the seeds):"
    methods = [r for r in figures["rows"] if r["kind"] not in ("teacher", "head")]
    return "\n".join([begin, "", fill(intro), "", *markdown_table(figures), "", fill(" ".join(comparisons(methods))),
                      "", end])


def render_detail(figures: dict) -> str:
    """docs/DEMO.md's section of the variant: the command, the machine, the table and the whole reading."""
    begin, end = markers(figures["variant"])
    intro = (f"The demo ran this command in {timing_words(figures)}, and printed (test top-1 %, last epoch, "
             f"mean ± std over the seeds):")
    return "\n".join([begin, "", f"    {figures['command']}", "", fill(intro), "", *markdown_table(figures), "",
                      fill(" ".join(reading(figures))), "", end])


def fill(text: str) -> str:
    """``text`` wrapped to the pages' width, never inside a word."""
    return textwrap.fill(text, WIDTH, break_on_hyphens=False)


def write_section(path: Path, variant: str, section: str) -> None:
    """Replace the variant's demo section of ``path`` (from its first marker to its last) with ``section``."""
    begin, end = markers(variant)
    text = path.read_text(encoding="utf-8")
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise UserError(f"{path} has no demo section for {variant}: put the two marker lines of "
                        f"scripts/demo_readme.py there")
    atomic_write_text(path, text[:start] + section + text[stop + len(end):])


def write_sections(figures: dict) -> None:
    """Rewrite the variant's sections of README.md and docs/DEMO.md from ``figures``."""
    write_section(README, figures["variant"], render_summary(figures))
    write_section(PAGE, figures["variant"], render_detail(figures))


def section_of(path: Path, variant: str) -> str:
    """The variant's current demo section of ``path``, markers included (empty when it has none)."""
    begin, end = markers(variant)
    text = path.read_text(encoding="utf-8")
    start, stop = text.find(begin), text.find(end)
    return text[start:stop + len(end)] if 0 <= start < stop else ""
