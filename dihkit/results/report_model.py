"""What the report reads and tabulates: result records, columns (pairs), rows, cells, and the protocol text."""
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import training_types  # noqa: F401  (fills the registry)
from dihkit.foundations.registry import REGISTRY
from dihkit.runs.evaluation import headline

MANIFEST_KIND = "dih-pipeline"
# What identifies a column, so never tells runs of one row apart.
COLUMN_KEYS = ("training_type", "teacher", "student", "dataset")
# Which epoch's test top-1 a figure is: the name a table, plot and CSV line print for each selection.
SELECTIONS = {"last": "last epoch", "best_val": "best-validation epoch",
              "best_test": "best test epoch, selected on the test set"}
# ``report.py --epoch``: the tables each choice prints, its main selection (plots, comparisons) first. The
# best-validation table follows either where runs have a validation split.
EPOCHS = {"last": ("last", "best_val"), "best": ("best_test", "best_val")}
PROTOCOL = (
    "Protocol: each cell is the mean ± sample standard deviation (n−1 denominator) of test top-1 (%) over "
    "the complete runs (seeds), n = their number; n=1 shows the single value. *Last epoch*: the model "
    "after the final epoch, the file every run writes. *Best-validation epoch*: the epoch with the highest "
    "top-1 on the validation images held out of the training set (`--val_size`), evaluated on test; only "
    "runs with a validation split have it. *Best test epoch* (`report.py --epoch best`): each run's highest "
    "test top-1 over its epochs, as mdistiller's and logit standardisation's tables report; it is selected on "
    "the test set, so it is optimistic. Teacher: the complete `ce` runs "
    "of the teacher architecture; head i: the complete `fine_tune` runs on that teacher; `(frozen)` rows: "
    "the frozen checkpoints' test accuracy measured inside the KD/DIH runs that used them (one value per "
    "distinct checkpoint; their training records were not among the folders). Two-phase methods count "
    "their final student only (FitNets stage 2, the TAKD student); intermediate phases are listed, never "
    "averaged. Each objective (dih, dih +LS, DIH[DKD], ...) is a row; its runs whose training flags differ "
    "are separate rows, labelled with the differing flags. Incomplete runs are listed and never averaged.")


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
    """The column a distillation run belongs to; None for a type that trains the teacher architecture (ce,
    fine_tune: they serve every column of it) and for a record lacking the dataset, teacher or student."""
    pair = Pair(args.get("dataset"), args.get("teacher"), args.get("student"))
    if trains_teacher(training_type) or None in (pair.dataset, pair.teacher, pair.student):
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
        t = REGISTRY.get(self.training_type)
        if t is None:
            return self.phase == self.training_type
        return self.phase == t.final_phase_name or self.phase in t.also_final

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

    def best_test(self, output: str | None = None) -> float | None:
        """The highest test top-1 over the run's epochs (of one named output; else the epoch's headline, the mean
        over its outputs), or None when no epoch recorded one."""
        tops = [e["test"][output]["top1"] if output else headline(e["test"])
                for e in self.record.get("history", []) if e.get("test") and (output is None or output in e["test"])]
        return max(tops, default=None)

    def figures(self, last: float, output: str | None = None) -> dict:
        """The run's test top-1 under each selection (``SELECTIONS``), ``last`` being its last epoch's."""
        return {"last": last, "best_val": self.best(output), "best_test": self.best_test(output)}


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
        model = self.args.get("teacher") if trains_teacher(self.training_type) else self.args.get("student")
        return f"{what} {model} on {self.args.get('dataset')}, seed {self.seed}: {self.progress} — `{self.path}`"


@dataclass(frozen=True)
class Row:
    """A row of the table: the teacher, head i, or a method (with its differing flags, if any)."""
    kind: str
    index: int = 0
    frozen: bool = False
    flags: str = ""
    title: str = ""               # the objective's name (the training type's report label)

    @property
    def label(self) -> str:
        """The row's name as printed."""
        name = {"teacher": "teacher", "head": f"head {self.index}"}.get(self.kind, self.title or self.kind)
        return name + (" (frozen)" if self.frozen else "") + (f" [{self.flags}]" if self.flags else "")

    def order(self) -> tuple:
        """Teacher, heads by depth, then the methods in the registry's report order (variants by title)."""
        group = {"teacher": 0, "head": 1}.get(self.kind)
        if group is None:
            t = REGISTRY.get(self.kind)
            group = 2 + (t.report_order if t else 10 ** 6)
        return group, self.index, self.frozen, self.kind, self.title.casefold(), self.flags

    @property
    def is_method(self) -> bool:
        """A student's row (not the teacher's or a head's)."""
        return self.kind not in ("teacher", "head")


@dataclass
class Cell:
    """The runs of one row in one column: (seed, {selection: test top-1 or None}, result)."""
    runs: list = field(default_factory=list)

    def add(self, seed, figures: dict, result: Result | None = None) -> None:
        """One run's figures, by selection (``SELECTIONS``; a missing one: the run has none)."""
        self.runs.append((seed, figures, result))

    def values(self, selection: str) -> list:
        """The runs' figures under ``selection`` (runs without validation have no best-validation figure)."""
        return [run[1][selection] for run in self.runs if run[1].get(selection) is not None]

    def seeds(self, selection: str = "last") -> list:
        """The seeds of the runs behind ``values(selection)`` ("-" for a frozen checkpoint's figure)."""
        return ["-" if run[0] is None else run[0] for run in self.runs if run[1].get(selection) is not None]

    def results(self) -> list:
        """The result records of the runs (frozen figures have none)."""
        return [run[2] for run in self.runs if run[2] is not None]


@dataclass
class Table:
    """Everything the report prints: cells by (row, column), and what was left out and why; ``epoch`` is
    ``report.py --epoch`` (``EPOCHS``), whose first selection the plots and comparisons show."""
    pairs: list
    cells: dict
    incomplete: list
    intermediate: Counter
    unused: list
    unreadable: list
    epoch: str = "last"

    @property
    def selection(self) -> str:
        """The main selection: ``last`` or ``best_test``."""
        return EPOCHS[self.epoch][0]

    def selection_title(self) -> str:
        """The main selection in words, for titles and labels."""
        return SELECTIONS[self.selection]

    def rows(self) -> list:
        """Every row that has a cell in some column, in table order."""
        return sorted({row for row, _ in self.cells}, key=Row.order)


def config_keys(training_type: str) -> tuple:
    """The flags whose values tell runs of one row apart: those that change what the type trains."""
    t = REGISTRY.get(training_type)
    return tuple(k for k in t.result_keys if k not in COLUMN_KEYS) if t else ()


def trains_teacher(training_type: str) -> bool:
    """Whether the type trains the model named by ``--teacher`` (a teacher, its heads, a student alone)."""
    t = REGISTRY.get(training_type)
    return t is not None and t.trains == "teacher"


def row_title(r: "Result") -> str:
    """The row title of a student's run: the objective its training type says it trained."""
    t = REGISTRY.get(r.training_type)
    return t.report_label(r.record.get("args", {})) if t else r.training_type


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
