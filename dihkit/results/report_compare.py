"""Which differences between a report's rows exceed the spread across seeds (``report.py --against ROW``).

For each column that has the reference row, every other method row gets the difference of the means, the two
standard deviations, and a verdict: a difference is *beyond the seed spread* when both rows have at least
two runs and the two intervals mean ± std do not overlap (|difference| > std + std of the reference). Welch's
t statistic and its Welch-Satterthwaite degrees of freedom are printed beside it, without a p-value: three
seeds make any test weak, and the verdict above is the stated criterion.
"""
import math

from dihkit.foundations.errors import UserError
from dihkit.results.report_model import Table, format_cell, summary

VERDICTS = {True: "**beyond**", False: "within", None: "not judged (n=1)"}


def welch(a: list, b: list) -> tuple:
    """(t, degrees of freedom) of Welch's unequal-variance t test of mean(a) - mean(b); (None, None) when either
    has a single value or both have no spread."""
    (ma, sa, na), (mb, sb, nb) = summary(a), summary(b)
    if sa is None or sb is None or sa == sb == 0:
        return None, None
    va, vb = sa * sa / na, sb * sb / nb
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    return (ma - mb) / math.sqrt(va + vb), df


def beyond_spread(a: list, b: list) -> bool | None:
    """Whether the intervals mean ± sample std of ``a`` and ``b`` do not overlap; None if either has n=1."""
    (ma, sa, _), (mb, sb, _) = summary(a), summary(b)
    if sa is None or sb is None:
        return None
    return abs(ma - mb) > sa + sb


def reference_row(rows: list, against: str):
    """The row ``--against`` names: by its label, else the one method row of that training type (``ce`` for
    the row labelled ``ce (student alone)``)."""
    found = ([row for row in rows if row.label == against]
             or [row for row in rows if row.is_method and row.kind == against])
    labels = ", ".join(f"'{row.label}'" for row in (found if len(found) > 1 else [r for r in rows if r.is_method]))
    if not found:
        raise UserError(f"--against '{against}' names no row of the table; its method rows: {labels}")
    if len(found) > 1:
        raise UserError(f"--against '{against}' names {len(found)} rows: {labels}; give one row's label")
    return found[0]


def comparison_lines(table: Table, against: str) -> list:
    """Markdown: per column, each method row's difference from the row ``against`` names (``reference_row``), at
    the table's epoch selection."""
    rows, selection = table.rows(), table.selection
    reference = reference_row(rows, against)
    against = reference.label
    out = [f"## Differences from {against} (test top-1, {table.selection_title()})", "",
           f"Beyond the seed spread: both rows have n >= 2 and |difference| > std + std ({against}), that is, "
           "the intervals mean ± std do not overlap. Welch's t and its degrees of freedom are for reference.", ""]
    for pair in table.pairs:
        ref = table.cells[(reference, pair)].values(selection) if (reference, pair) in table.cells else []
        if not ref:
            continue
        ref_mean = summary(ref)[0]
        out += [f"{pair.title()}; {against}: {format_cell(ref)}", "",
                "| row | mean | difference | std | beyond the seed spread? | Welch t (df) |",
                "|---|---|---|---|---|---|"]
        for row in rows:
            values = table.cells[(row, pair)].values(selection) if (row, pair) in table.cells else []
            if not row.is_method or row == reference or not values:
                continue
            (mean, std, n), (t, df) = summary(values), welch(values, ref)
            out.append(f"| {row.label} | {mean:.2f} (n={n}) | {mean - ref_mean:+.2f} | "
                       f"{'-' if std is None else f'{std:.2f}'} | {VERDICTS[beyond_spread(values, ref)]} | "
                       f"{'-' if t is None else f'{t:+.2f} ({df:.1f})'} |")
        out.append("")
    return out
