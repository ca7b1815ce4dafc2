"""Tables and plots from result files, as papers report them.

    python3 report.py RUN_FOLDER [RUN_FOLDER ...] [--out PATH] [--plots] [--against ROW] [--epoch last|best]

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
- each objective (the type's report label: ``dih``, ``dih +LS``, ``DIH[DKD]``) is a row; its runs whose
  training flags differ (``config_keys``: the flags that change what the method trains) are separate rows,
  labelled with those flags;
- a cell is the mean and sample standard deviation of test top-1 over the complete runs, with their
  number n, at the epoch ``--epoch`` selects: ``last`` (default) or ``best``, each run's highest test top-1
  over its epochs (selected on the test set, as mdistiller and logit standardisation report); every table,
  plot and CSV line names its selection; incomplete runs (a checkpoint without a complete result, or
  ``complete: false``) are listed under the table and never averaged.
"""
import argparse
import csv
import io
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from dihkit.files.atomic_files import atomic_write_text
from dihkit.files.checkpoints import safe_load
from dihkit.foundations.errors import UserError
from dihkit.foundations.flags import HelpFormatter, Parser
from dihkit.results.report_model import (EPOCHS, MANIFEST_KIND, PROTOCOL, SELECTIONS, Cell, Incomplete, Pair, Result,
                                         Row, Table, format_cell, row_title, summary)
from dihkit.results.report_compare import comparison_lines
from dihkit.results.report_plots import write_plots
from dihkit.foundations.registry import REGISTRY
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
    """(row kind, head index, result, figures by selection) for every complete final record belonging to ``pair``."""
    for r in results:
        if not r.is_final or r.dataset != pair.dataset:
            continue
        t = REGISTRY.get(r.training_type)
        if t is not None and t.trains == "teacher" and not t.output_is_dir:
            if r.arch == pair.teacher:
                yield "teacher", 0, r, r.figures(r.record["test_top1"])
            if r.arch == pair.student:
                yield r.training_type, 0, r, r.figures(r.record["test_top1"])
        elif t is not None and t.output_is_dir:
            if r.arg("teacher") == pair.teacher:
                for name, metrics in r.record["final_test"].items():
                    yield "head", int(name.rsplit("_", 1)[1]), r, r.figures(metrics["top1"], name)
        elif r.pair() == pair:
            yield r.training_type, 0, r, r.figures(r.record["test_top1"])


def frozen_entries(pair: Pair, results: list, kinds: set):
    """The teacher's (and heads') accuracy as the KD/DIH students' runs measured the frozen checkpoints,
    for the kinds in ``kinds`` that have no training record; one entry per distinct checkpoint."""
    seen = set()
    for r in results:
        t = REGISTRY.get(r.training_type)
        frozen = t is not None and t.frozen_reference
        if not frozen or r.pair() != pair or "reference_test" not in r.record:
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


def build_table(folders, epoch: str = "last") -> Table:
    """Read the folders and assign every complete record to its cell; ``epoch``: ``--epoch`` (``EPOCHS``)."""
    results, incomplete, declared, unreadable = collect(folders)
    if not results and not incomplete:
        raise UserError(f"no result files under {', '.join(map(str, folders))}")
    pairs = {r.pair() for r in results if r.is_final} | {i.pair() for i in incomplete} | set(declared)
    pairs = sorted(pairs - {None}, key=lambda p: (p.dataset, p.teacher, p.student))
    cells, used = {}, set()
    for pair in pairs:
        grouped = defaultdict(list)
        # Runs whose objectives have different titles (dih, dih +LS, DIH[DKD]) are rows of their own; only
        # the flags that differ among runs of one title label their rows.
        for kind, index, r, figures in own_entries(pair, results):
            grouped[(kind, index, row_title(r) if kind != "head" else "")].append((r, figures))
        for (kind, index, title), entries in grouped.items():
            labels = differing_flags(list(dict.fromkeys(r.config() for r, _ in entries)))
            for r, figures in entries:
                row = Row(kind, index, flags=labels[r.config()], title=title)
                cells.setdefault((row, pair), Cell()).add(r.record.get("seed"), figures, r)
                used.add(r.path)
        missing = {k for k in ("teacher", "head") if not any(key[0] == k for key in grouped)}
        for kind, index, last in frozen_entries(pair, results, missing):
            # A frozen checkpoint was measured once: its figure stands for either epoch selection.
            cells.setdefault((Row(kind, index, frozen=True), pair), Cell()).add(None, {"last": last, "best_test": last})
    intermediate = Counter(r.phase for r in results if not r.is_final)
    unused = [r for r in results if r.is_final and r.path not in used]
    return Table(pairs, cells, incomplete, intermediate, unused, unreadable, epoch)


# ----------------------------------------------------------------------------- output

def markdown(table: Table) -> str:
    """The tables (``--epoch``'s selection; best-validation epoch where any run has it), the protocol and the lists."""
    rows, pairs = table.rows(), table.pairs
    out = ["# Results", ""]
    for selection in EPOCHS[table.epoch]:
        if not any(cell.values(selection) for cell in table.cells.values()):
            continue
        out += [f"## Test top-1 (%), {SELECTIONS[selection]}", "", "| | " + " | ".join(p.title() for p in pairs) + " |",
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


# The CSV's name of each selection.
CSV_SELECTIONS = {"last": "last_epoch", "best_val": "best_val", "best_test": "best_test_selected_on_test"}


def csv_text(table: Table) -> str:
    """One line per (column, row, selection) with runs: mean, sample std, n, seeds and each run's value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "teacher", "student", "row", "selection", "mean", "std", "n", "seeds", "values"])
    for pair in table.pairs:
        for row in table.rows():
            cell = table.cells.get((row, pair))
            for selection in EPOCHS[table.epoch]:
                values = cell.values(selection) if cell else []
                if not values:
                    continue
                mean, std, n = summary(values)
                seeds = " ".join(map(str, cell.seeds(selection)))
                writer.writerow([pair.dataset, pair.teacher, pair.student, row.label,
                                 CSV_SELECTIONS[selection], f"{mean:.4f}",
                                 "" if std is None else f"{std:.4f}", n, seeds, " ".join(f"{v:.4f}" for v in values)])
    return buffer.getvalue()


def write_report(folders, out: Path, plots: bool = False, against: str | None = None, epoch: str = "last") -> str:
    """Build the table from ``folders``, write ``<out>.md``, ``<out>.csv`` (and plots); return the Markdown.
    ``against``: a row label or a training type; the Markdown then ends with each method's difference from
    that row. ``epoch``: which epoch's test top-1 (``EPOCHS``)."""
    table = build_table(folders, epoch)
    text = markdown(table) + ("\n".join(["", *comparison_lines(table, against)]) if against else "")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")]
    atomic_write_text(written[0], text)
    atomic_write_text(written[1], csv_text(table))
    if plots:
        written += write_plots(table, out)
    return text + "\nWritten: " + ", ".join(str(p) for p in written) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The report command's flags."""
    p = Parser(prog="report.py", description="Tables (Markdown, CSV) and plots from result files.",
               formatter_class=HelpFormatter)
    p.add_argument("folders", nargs="+", metavar="RUN_FOLDER", help="folders searched recursively for result files")
    p.add_argument("--out", default=None, help="output path without extension (default: <first RUN_FOLDER>/report)")
    p.add_argument("--plots", action="store_true", help="also write the per-epoch and by-depth plots as PNG")
    p.add_argument("--epoch", default="last", choices=list(EPOCHS),
                   help="which epoch's test top-1 the tables, plots and comparisons show: last (the model every run "
                        "writes; RepDistiller's tables) or best (each run's highest test top-1 over its epochs, as "
                        "mdistiller's and logit standardisation's tables report: selected on the test set); the "
                        "best-validation table (runs with --val_size) follows either")
    p.add_argument("--against", metavar="ROW", default=None,
                   help="also list each method's difference from the row labelled ROW, or from the row of training "
                        "type ROW (e.g. kd; ce: the student alone), and whether it exceeds the spread across seeds")
    return p


def main(argv=None) -> int:
    """Print the table and write its files; a user mistake is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.folders[0]) / "report"
    try:
        print(write_report(args.folders, out, args.plots, args.against, args.epoch))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
