"""A sweep's report: one row per trial (table, CSV) and every trial's validation curve."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from finetune.config import lower_is_better


def history(result) -> pd.DataFrame:
    """A Tune trial's reports (one per epoch, then the final test report), oldest first."""
    frame = result.metrics_dataframe
    return frame if frame is not None else pd.DataFrame()


def trial_id(result) -> str:
    frame = history(result)
    return str(frame["trial_id"].iloc[0]) if "trial_id" in frame and len(frame) else Path(result.path).name


SHORT_NAMES = {"best_epoch": "at epoch", "epochs_run": "epochs", "stopped_early": "stopped", "wall_s": "s"}


def results_table(rows: pd.DataFrame, metric: str) -> Table:
    """The trials best first; short headers, so that it fits a terminal (results.csv has it all)."""
    table = Table(title=f"sweep: {len(rows)} trials, ranked by {metric}")
    shown = [c for c in rows.columns if c not in ("params_json", "checkpoint")]
    for column in shown:
        header = "best" if column == f"best {metric}" else SHORT_NAMES.get(column, column.split(".")[-1])
        table.add_column(header, justify="left" if column in ("trial", "status") else "right")
    ordered = rows.sort_values(f"best {metric}", ascending=lower_is_better(metric), na_position="last")
    for _, row in ordered.iterrows():
        table.add_row(*(_cell(row[c]) for c in shown))
    return table


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_curves(results, metric: str, path: Path) -> None:
    """Validation metric per epoch, one line per trial, a cross where each trial ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for result in results:
        reports = history(result)
        if "epochs_done" not in reports or metric not in reports:
            continue
        epochs = reports[reports["epochs_done"].notna()]
        (line,) = axis.plot(epochs["epochs_done"], epochs[metric], marker="o", markersize=3, label=trial_id(result))
        axis.plot(epochs["epochs_done"].iloc[-1:], epochs[metric].iloc[-1:], "x", color=line.get_color())
    axis.set_xlabel("epochs done")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per trial")
    axis.grid(alpha=0.3)
    if len(results) <= 20:
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
