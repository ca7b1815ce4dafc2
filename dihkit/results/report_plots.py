"""The report's plots: test top-1 per epoch of each method, and each head against its depth (``--plots``)."""
import statistics
from pathlib import Path

from dihkit.files.atomic_files import atomic_savefig
from dihkit.runs.evaluation import headline
from dihkit.results.report_model import Pair, Table, summary


# Matplotlib's default cycle has ten colours; further series repeat them with another dash pattern.
DASHES = ("-", "--", "-.", ":")


def series_style(i: int, first_dash: int = 0) -> dict:
    """Colour and dash of the ``i``-th series, distinct for the first 40."""
    return {"color": f"C{i % 10}", "linestyle": DASHES[(first_dash + i // 10) % len(DASHES)]}


def finish_axes(fig, ax, path: Path) -> None:
    """Grid, the legend outside the axes (many rows would hide the data), and the file."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def plot_curves(table: Table, pair: Pair, path: Path, plt) -> bool:
    """Test top-1 per epoch of every method of ``pair``: mean over seeds, min-max band. False if none."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(8, 5))
    longest = 0
    methods = [row for row in table.rows() if row.is_method and (row, pair) in table.cells]
    for i, row in enumerate(methods):
        cell = table.cells[(row, pair)]
        curves = [[headline(e["test"]) for e in r.record.get("history", [])] for r in cell.results()]
        length = min(map(len, curves))
        if not length:
            continue
        values = np.array([c[:length] for c in curves])
        x = np.arange(1, length + 1)
        style = series_style(i)
        ax.plot(x, values.mean(axis=0), marker="o" if length <= 30 else None, markersize=3,
                label=f"{row.label} (n={len(curves)})", **style)
        if len(curves) > 1:
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=style["color"], alpha=0.15)
        longest = max(longest, length)
    for row in table.rows():
        values = table.cells[(row, pair)].values(table.selection) if (row, pair) in table.cells else []
        if row.kind == "teacher" and values:
            mean = statistics.fmean(values)
            ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"{row.label} {mean:.2f}")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)",
           title=f"{pair.title()}: test top-1 per epoch (every epoch; teacher line: {table.selection_title()})"
                 "\n(line: mean over seeds; band: min-max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, longest + 0.5)
    if longest:
        finish_axes(fig, ax, path)
    plt.close(fig)
    return longest > 0


def plot_depth(table: Table, pair: Pair, path: Path, plt) -> bool:
    """Each head's test top-1 against its mount point, then the teacher's; students as horizontal lines.
    With several teacher or head rows (differing flags), the first of each depth is drawn. False if none."""
    depth, selection = {}, table.selection
    for row in table.rows():
        values = table.cells[(row, pair)].values(selection) if (row, pair) in table.cells else []
        if values and not row.is_method:
            depth.setdefault((row.kind == "teacher", row.index), values)
    if not depth:
        return False
    keys = sorted(depth)
    labels = ["teacher" if is_teacher else f"head {i}" for is_teacher, i in keys]
    stats = [summary(depth[k]) for k in keys]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.errorbar(range(len(keys)), [m for m, _, _ in stats], yerr=[s or 0 for _, s, _ in stats], fmt="o-",
                color="black", capsize=4, label=f"{pair.teacher}: heads by depth, then the teacher")
    methods = [r for r in table.rows()
               if r.is_method and (r, pair) in table.cells and table.cells[(r, pair)].values(selection)]
    for i, row in enumerate(methods):
        mean = statistics.fmean(table.cells[(row, pair)].values(selection))
        ax.axhline(mean, linewidth=1.5, label=f"{row.label} {mean:.2f}", **series_style(i, first_dash=3))
    ax.set_xticks(range(len(keys)), labels)
    ax.set(xlabel="mount point (1 = shallowest)", ylabel=f"test top-1 (%), {table.selection_title()}",
           title=f"{pair.title()}: accuracy by depth (mean ± std over runs)")
    finish_axes(fig, ax, path)
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
