"""Where a run's wall time went, read from its folder: for ``python -m statetrainer report``.

The goodput ledger (``callbacks.GoodputLedger``) leaves one row per process in
its file in the run's folder, the last one updated until that process's last
moment. The report reads that file, or where it is missing or damaged the
ledger a checkpoint carries (the newest that verifies; a checkpoint knows the
time up to its save). Nothing is unpickled; the checkpoint is read as
``load_checkpoint`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .callbacks.goodput import BUCKETS, COLUMNS, LEDGER_FILE, LEDGER_KIND, LedgerRow
from .checkpoint import CheckpointFolder, atomic_write, read_live_table, read_tree
from .errors import CheckpointError
from .optional import require

__all__ = ["PRODUCTIVE", "GoodputReport", "read_goodput", "report_lines", "plot_goodput"]

PRODUCTIVE: tuple[str, ...] = ("data", "forward", "backward", "step", "evaluation", "callbacks")
"""The buckets of the run's own work, done once: the goodput. The rest is startup, checkpoint I/O, work run again
after a failure, downtime and the time between phases and epochs."""


@dataclass(frozen=True)
class GoodputReport:
    """A run's ledger, read back.

    Attributes:
        source: The file it was read from: the ledger's own, or a checkpoint.
        rows: One per process, in the order they ran.
        warning: Why the ledger's own file was not used (None: it was).
    """

    source: Path
    rows: list[LedgerRow]
    warning: str | None = None

    @property
    def seconds(self) -> dict[str, float]:
        """Every process's seconds together, per bucket."""
        return {name: sum(row.seconds[name] for row in self.rows) for name in BUCKETS}

    @property
    def total(self) -> float:
        """All the wall time the ledger accounts for: every process's, and the downtime between them."""
        return sum(self.seconds.values())

    @property
    def goodput(self) -> float:
        """The share of the total in the ``PRODUCTIVE`` buckets."""
        total = self.total
        return sum(self.seconds[name] for name in PRODUCTIVE) / total if total > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"source": str(self.source), "warning": self.warning, "total": self.total, "goodput": self.goodput,
                "seconds": self.seconds,
                "processes": [{"started": row.started, "ran": row.ran, "batches": row.batches,
                               "lost_batches": row.lost_batches, "seconds": row.seconds} for row in self.rows]}  # fmt: skip


def read_goodput(folder: Path) -> GoodputReport:
    """The ledger of the run in ``folder``: its file, or the newest verified checkpoint's.

    Raises:
        CheckpointError: Neither the file nor any checkpoint there holds a ledger.
        ValueError: ``folder`` is not a folder.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the run's checkpoint folder, where its {LEDGER_FILE} is")
    path, warning = folder / LEDGER_FILE, None
    if path.is_file():
        try:
            table = read_live_table(path, LEDGER_KIND)
            if table.columns != COLUMNS:
                raise CheckpointError(f"{path} has the columns {list(table.columns)}, not {list(COLUMNS)}")
            return GoodputReport(path, [LedgerRow.of(row) for row in table.rows])
        except (CheckpointError, OSError) as error:
            warning = f"{error}; read the ledger of the newest checkpoint instead, which ends at its save"
    else:
        warning = f"{path} is missing; read the ledger of the newest checkpoint instead, which ends at its save"
    for checkpoint in reversed(CheckpointFolder(folder).checkpoints()):
        try:
            rows = _ledger_rows(read_tree(checkpoint))
        except CheckpointError:
            continue
        if rows is not None:
            return GoodputReport(checkpoint, [LedgerRow.of(row) for row in rows], warning)
    raise CheckpointError(f"no goodput ledger in {folder}: neither {LEDGER_FILE} nor a checkpoint holding one; add "
                          "statetrainer.callbacks.GoodputLedger(folder) to the run's callbacks")  # fmt: skip


def _ledger_rows(tree: Any) -> list[list[float]] | None:
    """The rows of the ledger in a checkpoint's callbacks, None if it has none."""
    callbacks = tree.get("callbacks") if isinstance(tree, dict) else None
    for state in (callbacks or {}).values():
        if isinstance(state, dict) and state.get("columns") == list(COLUMNS):
            rows = state.get("rows")
            if isinstance(rows, torch.Tensor) and rows.dim() == 2 and rows.shape[1] == len(COLUMNS):
                return rows.tolist()
    return None


_LABELS = {name: name.replace("_", " ") for name in BUCKETS}


def report_lines(report: GoodputReport) -> list[str]:
    """The report as a table: a row per bucket, a column per process, then the run's total and share."""
    rows, seconds, total = report.rows, report.seconds, report.total
    restarts = len(rows) - 1
    lost = [row.lost_batches for row in rows[1:]]
    lines = [f"goodput ledger: {report.source}"]
    if report.warning:
        lines.append(f"  ({report.warning})")
    lines.append(f"{len(rows)} process(es), {restarts} restart(s), {rows[-1].batches} batches done; "
                 f"{total:.1f} s in all, goodput {report.goodput:.1%} ({', '.join(PRODUCTIVE)})")  # fmt: skip
    if restarts:
        told = ", ".join("not known" if count < 0 else str(count) for count in lost)
        lines.append(f"batches done again after each restart (done before a kill, after the last save): {told}")
    width = max(len(label) for label in _LABELS.values())
    header = f"{'':<{width}}  " + "".join(f"{f'process {index + 1}':>12}" for index in range(len(rows)))
    lines.append(header + f"{'total':>12}{'share':>8}")
    for name in BUCKETS:
        share = seconds[name] / total if total > 0 else 0.0
        cells = "".join(f"{row.seconds[name]:>12.3f}" for row in rows)
        lines.append(f"{_LABELS[name]:<{width}}  {cells}{seconds[name]:>12.3f}{share:>8.1%}")
    cells = "".join(f"{sum(row.seconds.values()):>12.3f}" for row in rows)
    lines.append(f"{'total':<{width}}  {cells}{total:>12.3f}{1:>8.0%}")
    return lines


def plot_goodput(report: GoodputReport, path: Path) -> None:
    """Draw the report as stacked bars (one per process, and the run's), written atomically as a PNG.

    Raises:
        ImportError: matplotlib is missing (the ``plots`` extra).
    """
    matplotlib = require("matplotlib", "plots", "report --plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = [*(row.seconds for row in report.rows), report.seconds]
    labels = [*(f"process {index + 1}" for index in range(len(report.rows))), "run"]
    figure = Figure(figsize=(1.6 * len(bars) + 4, 4.5))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    bottoms = [0.0] * len(bars)
    colours = matplotlib.colormaps["tab20"]  # twelve buckets: the default cycle of ten would repeat colours
    for index, name in enumerate(BUCKETS):
        heights = [bar[name] for bar in bars]
        if any(heights):
            axis.bar(labels, heights, bottom=bottoms, label=_LABELS[name], color=colours(index))
            bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=True)]
    axis.set_ylabel("seconds")
    axis.set_title(f"where the run's {report.total:.1f} s went (goodput {report.goodput:.1%})")
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
