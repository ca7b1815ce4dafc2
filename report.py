"""Tables and plots from result files, as papers report them.

    python3 report.py RUN_FOLDER [RUN_FOLDER ...] [--out PATH] [--plots]

Reads every result file (the ``*.json`` the training loop writes) under the folders, recursively, prints
the table as Markdown and writes ``<out>.md`` and ``<out>.csv`` (default ``<first folder>/report``); with
``--plots`` also ``<out>_curves_<pair>.png`` (test top-1 per epoch of each method, mean line and min-max
band over seeds) and ``<out>_depth_<pair>.png`` (each head against its depth, then the teacher; students
as horizontal lines).

The rules, stated again under every table:
- columns are (dataset, teacher, student) pairs, taken from the distillation runs' arguments and from
  the manifests ``--training_type pipeline`` writes; rows are the teacher, its heads and the methods;
- the teacher row holds the complete ``ce`` runs of the column's teacher architecture on its dataset, the
  head rows the complete ``fine_tune`` runs on that teacher, the ``ce`` row the complete ``ce`` runs of the
  student architecture (the student trained alone), every other row the method's final student; when no
  teacher (or heads) training record is among the folders, the frozen checkpoints' accuracy measured
  inside the KD/DIH runs that used them fills a ``(frozen)`` row instead, one value per distinct checkpoint;
- only a method's final phase counts (``FINAL_PHASE``; otherwise the phase named after the training
  type): FitNets stage 1 (``fitnets_1``), TAKD's assistant (``takd_ta``) and the heads TOFD/MHKD fine-tune on
  the teacher (``tofd_teacher``, ``mhkd_teacher``) are intermediate stages, counted but never averaged;
- runs of one row whose training flags differ (``config_keys``: the flags that change what the method
  trains) are separate rows, labelled with those flags;
- a cell is the mean and sample standard deviation of test top-1 over the complete runs, with their
  number n; incomplete runs (a checkpoint without a complete result, or ``complete: false``) are listed
  under the table and never averaged.
"""
import argparse
import csv
import io
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from checkpoints import safe_load
from errors import UserError
from final_test import Parser, build_parser as console_parser
from pipeline import training_flags

MANIFEST_KIND = "dih-pipeline"
# The phase holding a method's final student when it is not the training type's own name.
FINAL_PHASE = {"fitnets": "fitnets_2"}
METHOD_ORDER = ("ce", "kd", "dih", "fitnets", "takd", "at", "crd", "tofd", "mhkd")
TITLES = {"ce": "ce (student alone)"}
# What identifies a column, so never tells runs of one row apart.
COLUMN_KEYS = ("training_type", "teacher", "student", "dataset")
SELECTIONS = (("last", "last epoch"), ("best", "best-validation epoch"))
PROTOCOL = (
    "Protocol: each cell is the mean ± sample standard deviation (n−1 denominator) of test top-1 (%) over "
    "the complete runs (seeds), n = their number; n=1 shows the single value. *Last epoch*: the model "
    "after the final epoch, the file every run writes. *Best-validation epoch*: the epoch with the highest "
    "top-1 on the validation images held out of the training set (`--val_size`), evaluated on test; only "
    "runs with a validation split have it. The test split selects nothing. Teacher: the complete `ce` runs "
    "of the teacher architecture; head i: the complete `fine_tune` runs on that teacher; `(frozen)` rows: "
    "the frozen checkpoints' test accuracy measured inside the KD/DIH runs that used them (one value per "
    "distinct checkpoint; their training records were not among the folders). Two-phase methods count "
    "their final student only (FitNets stage 2, the TAKD student); intermediate phases are listed, never "
    "averaged. Runs whose training flags differ are separate rows, labelled with the differing flags. "
    "Incomplete runs are listed and never averaged.")


@dataclass(frozen=True)
class Pair:
    """A column: the dataset, the teacher architecture and the student architecture."""
    dataset: str
    teacher: str
    student: str

    def title(self) -> str:
        """``cifar100: res110 → res8``."""
        return f"{self.dataset}: {self.teacher} → {self.student}"

    def slug(self) -> str:
        """A file-name-safe form of the pair."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{self.dataset}_{self.teacher}_{self.student}")


def run_pair(training_type: str, args: dict) -> Pair | None:
    """The column a distillation run belongs to; None for ce and fine_tune (they serve every column of
    their architecture) and for a record lacking the dataset, teacher or student."""
    pair = Pair(args.get("dataset"), args.get("teacher"), args.get("student"))
    if training_type in ("ce", "fine_tune") or None in (pair.dataset, pair.teacher, pair.student):
        return None
    return pair


@dataclass(frozen=True)
class Result:
    """One result file of the training loop."""
    path: Path
    record: dict

    def arg(self, key: str):
        """The run's value of flag ``key`` (None when the record lacks it)."""
        return self.record.get("args", {}).get(key)

    @property
    def training_type(self) -> str:
        """The run's ``--training_type``."""
        return self.record["training_type"]

    @property
    def phase(self) -> str:
        """The phase this file records (two-phase methods write one file per phase)."""
        return self.record["phase"]

    @property
    def is_final(self) -> bool:
        """Whether this phase is the one whose model the method delivers."""
        return self.phase == FINAL_PHASE.get(self.training_type, self.training_type)

    @property
    def dataset(self) -> str:
        """The dataset the run trained on."""
        return self.arg("dataset") or self.record.get("meta", {}).get("dataset")

    @property
    def arch(self) -> str:
        """The architecture this phase trained (for ``ce``, the model named by ``--teacher``)."""
        return self.record.get("meta", {}).get("arch") or self.arg("teacher")

    def pair(self) -> Pair | None:
        """The column this run belongs to (see ``run_pair``)."""
        return run_pair(self.training_type, self.record.get("args", {}))

    def config(self) -> tuple:
        """The flags that change what this training type trains (``config_keys``), as comparable text."""
        args = self.record.get("args", {})
        return tuple((k, json.dumps(args[k], sort_keys=True)) for k in config_keys(self.training_type) if k in args)

    def best(self, output: str | None = None) -> float | None:
        """Test top-1 at the best-validation epoch (of one named output), or None without validation."""
        best = self.record.get("best_val")
        if not best:
            return None
        return best["test"][output]["top1"] if output else best["test_top1"]


@dataclass(frozen=True)
class Incomplete:
    """A run that did not finish: a checkpoint without a complete result, or ``complete: false``."""
    path: Path
    training_type: str
    phase: str
    seed: object
    args: dict
    progress: str

    def pair(self) -> Pair | None:
        """The column this run belongs to (see ``run_pair``)."""
        return run_pair(self.training_type, self.args)

    def describe(self) -> str:
        """One line for the list under the table."""
        what = self.training_type + (f" ({self.phase})" if self.phase != self.training_type else "")
        model = self.args.get("teacher") if self.training_type in ("ce", "fine_tune") else self.args.get("student")
        return f"{what} {model} on {self.args.get('dataset')}, seed {self.seed}: {self.progress} — `{self.path}`"


@dataclass(frozen=True)
class Row:
    """A row of the table: the teacher, head i, or a method (with its differing flags, if any)."""
    kind: str
    index: int = 0
    frozen: bool = False
    flags: str = ""

    @property
    def label(self) -> str:
        """The row's name as printed."""
        name = {"teacher": "teacher", "head": f"head {self.index}"}.get(self.kind, TITLES.get(self.kind, self.kind))
        return name + (" (frozen)" if self.frozen else "") + (f" [{self.flags}]" if self.flags else "")

    def order(self) -> tuple:
        """Teacher, heads by depth, then the methods in the paper's order."""
        group = {"teacher": 0, "head": 1}.get(self.kind)
        if group is None:
            group = 2 + (METHOD_ORDER.index(self.kind) if self.kind in METHOD_ORDER else len(METHOD_ORDER))
        return group, self.index, self.frozen, self.kind, self.flags

    @property
    def is_method(self) -> bool:
        """A student's row (not the teacher's or a head's)."""
        return self.kind not in ("teacher", "head")


@dataclass
class Cell:
    """The runs of one row in one column: (seed, last-epoch test top-1, best-validation test top-1 or None, result)."""
    runs: list = field(default_factory=list)

    def add(self, seed, last: float, best: float | None, result: Result | None = None) -> None:
        """One run's figures."""
        self.runs.append((seed, last, best, result))

    def values(self, selection: str) -> list:
        """The runs' figures for ``last`` or ``best`` (runs without validation have no best figure)."""
        column = 1 if selection == "last" else 2
        return [run[column] for run in self.runs if run[column] is not None]

    def seeds(self, selection: str = "last") -> list:
        """The seeds of the runs behind ``values(selection)`` ("-" for a frozen checkpoint's figure)."""
        column = 1 if selection == "last" else 2
        return ["-" if run[0] is None else run[0] for run in self.runs if run[column] is not None]

    def results(self) -> list:
        """The result records of the runs (frozen figures have none)."""
        return [run[3] for run in self.runs if run[3] is not None]


@dataclass
class Table:
    """Everything the report prints: cells by (row, column), and what was left out and why."""
    pairs: list
    cells: dict
    incomplete: list
    intermediate: Counter
    unused: list
    unreadable: list

    def rows(self) -> list:
        """Every row that has a cell in some column, in table order."""
        return sorted({row for row, _ in self.cells}, key=Row.order)


@cache
def config_keys(training_type: str) -> tuple:
    """The flags whose values tell runs of one row apart: those that change what the type trains."""
    return tuple(k for k in training_flags(console_parser(), training_type) if k not in COLUMN_KEYS)


def summary(values: list) -> tuple:
    """(mean, sample std or None for one value, n)."""
    n = len(values)
    return statistics.fmean(values), statistics.stdev(values) if n > 1 else None, n


def format_cell(values: list) -> str:
    """``71.23 ± 0.45 (n=3)``, ``72.38 (n=1)``, or empty."""
    if not values:
        return ""
    mean, std, n = summary(values)
    return f"{mean:.2f} ± {std:.2f} (n={n})" if std is not None else f"{mean:.2f} (n=1)"


# ----------------------------------------------------------------------------- reading

def state_result(path: Path) -> Path:
    """The result file belonging to a checkpoint: ``x.state.pth`` -> ``x.json``, ``d/state.pth`` -> ``d/result.json``."""
    if path.name == "state.pth":
        return path.with_name("result.json")
    return path.with_name(path.name[:-len(".state.pth")] + ".json")


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a readable result file with ``complete: true``."""
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def read_state(path: Path) -> Incomplete:
    """An interrupted run, described from its resumable checkpoint."""
    try:
        state = safe_load(path, "resume state")
    except UserError:
        return Incomplete(path, "?", "?", "?", {}, "unreadable checkpoint")
    args = state.get("args", {})
    progress = f"stopped after {state.get('epoch', '?')} epoch(s)"
    if state.get("batch"):
        progress += f" and {state['batch']} batch(es)"
    kind = args.get("training_type", "?")
    return Incomplete(path, kind, state.get("phase", kind), state.get("seed", "?"), args, progress)


def collect(folders) -> tuple:
    """(complete results, incomplete runs, pairs declared by pipeline manifests, unreadable files) under ``folders``."""
    results, incomplete, declared, unreadable, seen = [], [], [], [], set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UserError(f"run folder '{folder}' does not exist or is not a folder")
        for path in sorted(folder.rglob("*.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                obj = json.loads(path.read_text())
            except (OSError, ValueError):
                unreadable.append(path)
                continue
            if not isinstance(obj, dict):
                continue
            if obj.get("kind") == MANIFEST_KIND:
                declared.append(Pair(obj["dataset"], obj["teacher"], obj["student"]))
            elif "training_type" in obj and "phase" in obj:
                if obj.get("complete"):
                    results.append(Result(path, obj))
                else:
                    incomplete.append(Incomplete(path, obj["training_type"], obj["phase"], obj.get("seed"),
                                                 obj.get("args", {}), f"{len(obj.get('history', []))} epoch(s) "
                                                 "recorded, complete: false"))
        for path in sorted(folder.rglob("*state.pth")):
            if path.name not in ("state.pth",) and not path.name.endswith(".state.pth"):
                continue
            if path.resolve() in seen or is_complete(state_result(path)):
                continue
            seen.add(path.resolve())
            incomplete.append(read_state(path))
    return results, incomplete, declared, unreadable


# ----------------------------------------------------------------------------- the table

def own_entries(pair: Pair, results: list):
    """(row kind, head index, result, last, best) for every complete final record belonging to ``pair``."""
    for r in results:
        if not r.is_final or r.dataset != pair.dataset:
            continue
        if r.training_type == "ce":
            if r.arch == pair.teacher:
                yield "teacher", 0, r, r.record["test_top1"], r.best()
            if r.arch == pair.student:
                yield "ce", 0, r, r.record["test_top1"], r.best()
        elif r.training_type == "fine_tune":
            if r.arg("teacher") == pair.teacher:
                for name, metrics in r.record["final_test"].items():
                    yield "head", int(name.rsplit("_", 1)[1]), r, metrics["top1"], r.best(name)
        elif r.pair() == pair:
            yield r.training_type, 0, r, r.record["test_top1"], r.best()


def frozen_entries(pair: Pair, results: list, kinds: set):
    """The teacher's (and heads') accuracy as the KD/DIH students' runs measured the frozen checkpoints,
    for the kinds in ``kinds`` that have no training record; one entry per distinct checkpoint."""
    seen = set()
    for r in results:
        if r.training_type not in ("kd", "dih") or r.pair() != pair or "reference_test" not in r.record:
            continue
        for name, metrics in r.record["reference_test"].items():
            kind, index = ("teacher", 0) if name == "teacher" else ("head", int(name.rsplit("_", 1)[1]))
            source = (kind, index, r.arg("saved_path"), r.arg("saved_intermediates_directory") if index else None)
            if kind in kinds and source not in seen:
                seen.add(source)
                yield kind, index, metrics["top1"]


def differing_flags(configs: list) -> dict:
    """For each config: the flags whose values differ among ``configs``, as ``flag=value`` text."""
    keys = sorted({k for c in configs for k, _ in c})
    values = [dict(c) for c in configs]
    differ = [k for k in keys if len({v.get(k) for v in values}) > 1]
    return {c: ", ".join(f"{k}={json.loads(v[k]) if k in v else '-'}" for k in differ)
            for c, v in zip(configs, values)}


def build_table(folders) -> Table:
    """Read the folders and assign every complete record to its cell."""
    results, incomplete, declared, unreadable = collect(folders)
    if not results and not incomplete:
        raise UserError(f"no result files under {', '.join(map(str, folders))}")
    pairs = {r.pair() for r in results if r.is_final} | {i.pair() for i in incomplete} | set(declared)
    pairs = sorted(pairs - {None}, key=lambda p: (p.dataset, p.teacher, p.student))
    cells, used = {}, set()
    for pair in pairs:
        grouped = defaultdict(list)
        for kind, index, r, last, best in own_entries(pair, results):
            grouped[(kind, index)].append((r, last, best))
        for (kind, index), entries in grouped.items():
            labels = differing_flags(list(dict.fromkeys(r.config() for r, _, _ in entries)))
            for r, last, best in entries:
                cells.setdefault((Row(kind, index, flags=labels[r.config()]), pair), Cell()).add(
                    r.record.get("seed"), last, best, r)
                used.add(r.path)
        missing = {k for k in ("teacher", "head") if not any(kind == k for kind, _ in grouped)}
        for kind, index, last in frozen_entries(pair, results, missing):
            cells.setdefault((Row(kind, index, frozen=True), pair), Cell()).add(None, last, None)
    intermediate = Counter(r.phase for r in results if not r.is_final)
    unused = [r for r in results if r.is_final and r.path not in used]
    return Table(pairs, cells, incomplete, intermediate, unused, unreadable)


# ----------------------------------------------------------------------------- output

def markdown(table: Table) -> str:
    """The tables (last epoch; best-validation epoch where any run has it), the protocol and the lists."""
    rows, pairs = table.rows(), table.pairs
    out = ["# Results", ""]
    for selection, title in SELECTIONS:
        if not any(cell.values(selection) for cell in table.cells.values()):
            continue
        out += [f"## Test top-1 (%), {title}", "", "| | " + " | ".join(p.title() for p in pairs) + " |",
                "|---|" + "---|" * len(pairs)]
        for row in rows:
            cells = [format_cell(table.cells[(row, p)].values(selection)) if (row, p) in table.cells else ""
                     for p in pairs]
            if any(cells):
                out.append(f"| {row.label} | " + " | ".join(cells) + " |")
        out.append("")
    out += [PROTOCOL, "", "Seeds of the complete runs:", ""]
    for pair in pairs:
        seeds = [f"{row.label}: {' '.join(map(str, table.cells[(row, pair)].seeds()))}"
                 for row in rows if (row, pair) in table.cells and not row.frozen]
        out.append(f"- {pair.title()} — " + ("; ".join(seeds) if seeds else "none"))
    out += ["", "Incomplete runs (not averaged):", ""]
    out += [f"- {i.describe()}" for i in table.incomplete] or ["- none"]
    if table.intermediate:
        out += ["", "Intermediate phases (excluded from the rows): "
                + ", ".join(f"{phase} ×{n}" for phase, n in sorted(table.intermediate.items()))]
    if table.unused:
        out += ["", "Complete runs that belong to no column (no distillation run or manifest names their pair):", ""]
        out += [f"- {r.training_type} {r.arch} on {r.dataset}, seed {r.record.get('seed')} — `{r.path}`"
                for r in table.unused]
    if table.unreadable:
        out += ["", "Unreadable JSON files (skipped): " + ", ".join(f"`{p}`" for p in table.unreadable)]
    return "\n".join(out) + "\n"


def csv_text(table: Table) -> str:
    """One line per (column, row, selection) with runs: mean, sample std, n, seeds and each run's value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "teacher", "student", "row", "selection", "mean", "std", "n", "seeds", "values"])
    for pair in table.pairs:
        for row in table.rows():
            cell = table.cells.get((row, pair))
            for selection, _ in SELECTIONS:
                values = cell.values(selection) if cell else []
                if not values:
                    continue
                mean, std, n = summary(values)
                seeds = " ".join(map(str, cell.seeds(selection)))
                writer.writerow([pair.dataset, pair.teacher, pair.student, row.label,
                                 "last_epoch" if selection == "last" else "best_val", f"{mean:.4f}",
                                 "" if std is None else f"{std:.4f}", n, seeds, " ".join(f"{v:.4f}" for v in values)])
    return buffer.getvalue()


def headline(metrics: dict) -> float:
    """Mean top-1 over a split's outputs (the loop's own headline)."""
    return sum(m["top1"] for m in metrics.values()) / len(metrics)


def plot_curves(table: Table, pair: Pair, path: Path, plt) -> bool:
    """Test top-1 per epoch of every method of ``pair``: mean over seeds, min-max band. False if none."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(8, 5))
    longest = 0
    for row in table.rows():
        cell = table.cells.get((row, pair))
        if cell is None or not row.is_method:
            continue
        curves = [[headline(e["test"]) for e in r.record.get("history", [])] for r in cell.results()]
        length = min(map(len, curves))
        if not length:
            continue
        values = np.array([c[:length] for c in curves])
        x = np.arange(1, length + 1)
        line, = ax.plot(x, values.mean(axis=0), marker="o" if length <= 30 else None, markersize=3,
                        label=f"{row.label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
        longest = max(longest, length)
    for row in table.rows():
        if row.kind == "teacher" and (row, pair) in table.cells:
            mean = statistics.fmean(table.cells[(row, pair)].values("last"))
            ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"{row.label} {mean:.2f}")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)",
           title=f"{pair.title()}: test top-1 per epoch\n(line: mean over seeds; band: min-max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, longest + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    if longest:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return longest > 0


def plot_depth(table: Table, pair: Pair, path: Path, plt) -> bool:
    """Each head's test top-1 against its mount point, then the teacher's; students as horizontal lines.
    With several teacher or head rows (differing flags), the first of each depth is drawn. False if none."""
    depth = {}
    for row in table.rows():
        if (row, pair) in table.cells and not row.is_method:
            depth.setdefault((row.kind == "teacher", row.index), table.cells[(row, pair)].values("last"))
    if not depth:
        return False
    keys = sorted(depth)
    labels = ["teacher" if is_teacher else f"head {i}" for is_teacher, i in keys]
    stats = [summary(depth[k]) for k in keys]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.errorbar(range(len(keys)), [m for m, _, _ in stats], yerr=[s or 0 for _, s, _ in stats], fmt="o-",
                color="black", capsize=4, label=f"{pair.teacher}: heads by depth, then the teacher")
    for i, row in enumerate(r for r in table.rows() if r.is_method and (r, pair) in table.cells):
        mean = statistics.fmean(table.cells[(row, pair)].values("last"))
        ax.axhline(mean, color=f"C{i}", linestyle=":", linewidth=1.5, label=f"{row.label} {mean:.2f}")
    ax.set_xticks(range(len(keys)), labels)
    ax.set(xlabel="mount point (1 = shallowest)", ylabel="test top-1 (%), last epoch",
           title=f"{pair.title()}: accuracy by depth (mean ± std over runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(table: Table, out: Path) -> list:
    """Both plots for every column; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for pair in table.pairs:
        for name, draw in (("curves", plot_curves), ("depth", plot_depth)):
            path = out.with_name(f"{out.name}_{name}_{pair.slug()}.png")
            if draw(table, pair, path, plt):
                written.append(path)
    return written


def write_report(folders, out: Path, plots: bool = False) -> str:
    """Build the table from ``folders``, write ``<out>.md``, ``<out>.csv`` (and plots); return the Markdown."""
    table = build_table(folders)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(table)
    written = [out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")]
    written[0].write_text(text, encoding="utf-8")
    written[1].write_text(csv_text(table), encoding="utf-8")
    if plots:
        written += write_plots(table, out)
    return text + "\nWritten: " + ", ".join(str(p) for p in written) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The report command's flags."""
    p = Parser(prog="report.py", description="Tables (Markdown, CSV) and plots from result files.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="RUN_FOLDER", help="folders searched recursively for result files")
    p.add_argument("--out", default=None, help="output path without extension (default: <first RUN_FOLDER>/report)")
    p.add_argument("--plots", action="store_true", help="also write the per-epoch and by-depth plots as PNG")
    return p


def main(argv=None) -> int:
    """Print the table and write its files; a user mistake is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.folders[0]) / "report"
    try:
        print(write_report(args.folders, out, args.plots))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
