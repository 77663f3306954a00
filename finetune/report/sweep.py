"""A sweep's report: one row per trial (table, CSV), every trial's validation curve, and
report.html (`sweep_report`), built from the sweep directory alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml
from rich.table import Table

from finetune import config as config_module
from finetune import files
from finetune.config import lower_is_better
from finetune.report import figures
from finetune.report.html import figure, format_value, notes, page, paragraph, preformatted, section, table


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
        table.add_row(*(format_value(row[c]) for c in shown))
    return table


def sweep_report(sweep_dir: Path) -> str:
    """The winner, every trial (table and curves), the searched values against the metric, and
    where each trial ended, from SWEEP_DIR's summary.json, results.csv, pipeline.yaml and
    trials/<trial>/metrics.jsonl."""
    sweep_dir = Path(sweep_dir)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    base_raw = yaml.safe_load((sweep_dir / "pipeline.yaml").read_text())
    cfg = config_module.parse(base_raw)
    metric, mode = summary["metric"], summary["mode"]
    keys = list(cfg.tune.search_space)
    trials = pd.read_csv(sweep_dir / "results.csv").sort_values(f"best {metric}", ascending=(mode == "min"), na_position="last")
    trials = trials.astype(object).where(trials.notna(), None)
    records = trials.to_dict("records")
    winner = (summary.get("best") or {}).get("trial")
    curves = {}
    for record in records:
        # Tune's view, as results.csv: an epoch a stopped trial trained while Tune's stop was on its
        # way is in the trial's metrics.jsonl, but not among the epochs Tune ranked it by
        epochs = [e for e in files.read_json_lines(sweep_dir / "trials" / str(record["trial"]) / "metrics.jsonl")
                  if metric in e and e["epochs_done"] <= int(record["epochs_run"] or 0)]  # fmt: skip
        curves[record["trial"]] = ([e["epochs_done"] for e in epochs], [e[metric] for e in epochs])
    planned = max([cfg.train.epochs, *(int(r["epochs_run"] or 0) for r in records)])
    outcomes = ["errored" if r["status"] == "ERROR" else "stopped early" if r["stopped_early"] else "finished" for r in records]
    headers = ["trial", *keys, f"best {metric}", "at epoch", "epochs run", "ended", "seconds"]
    rows = [[r["trial"], *(r.get(k) for k in keys), r[f"best {metric}"], r["best_epoch"], r["epochs_run"], outcome, r["wall_s"]]
            for r, outcome in zip(records, outcomes)]  # fmt: skip
    marked = {i for i, r in enumerate(records) if r["trial"] == winner}
    sections = [
        _winner(summary, metric),
        section("Trials, best first", table(headers, rows, marked=marked), anchor="trials"),
        section("Every trial's curve", figure(figures.trial_curves(curves, metric, planned, winner),
                                              f"{metric} after each epoch; the winner drawn thick",
                                              "trial curves"), anchor="curves"),  # fmt: skip
    ]
    if records:
        pc_rows = [{**{k: r.get(k) for k in keys}, metric: r[f"best {metric}"]} for r in records]
        sections.append(section("Searched values against the metric", figure(
            figures.parallel_coordinates(pc_rows, keys, metric, lower_is_better(metric)),
            "one line per trial: its values on each searched key and its best metric", "parallel coordinates"),
            anchor="parallel"))  # fmt: skip
        sections.append(section("Where each trial ended", paragraph(_scheduler_text(cfg)), figure(
            figures.epochs_per_trial([str(r["trial"]) for r in records], [int(r["epochs_run"] or 0) for r in records],
                                     planned, outcomes), "epochs each trial ran", "epochs per trial"),
            anchor="stops"))  # fmt: skip
    sections.append(section("The sweep's pipeline", preformatted((sweep_dir / "pipeline.yaml").read_text()), anchor="config"))
    subtitle = (f"{summary['trials']} trials · metric {metric} ({mode}) · {summary['stopped_early']} stopped early · "
                f"{summary['errored']} errored · {summary['wall_s']:.0f} s · {sweep_dir}")  # fmt: skip
    return page(f"finetune sweep: {cfg.name}", subtitle, sections)


def _winner(summary: dict, metric: str) -> str:
    best = summary.get("best")
    if not best:
        return section("Winner", notes(["no trial finished an epoch: there is no winner"]), anchor="winner")
    tested = [[key, value] for key, value in best.items() if key.startswith("test/") and not key.endswith("/samples")]
    parts = [
        paragraph(f"trial {best['trial']}: {metric} {best[metric]:.4g} at epoch {best['epoch']}"),
        table(["searched key", "value"], [[k, v] for k, v in best["params"].items()]),
        table(["test metric (the winner's best checkpoint)", "value"], tested) if tested else "",
        paragraph(f"retrain with: finetune train {best['pipeline']}"),
    ]
    return section("Winner", *parts, anchor="winner")


def _scheduler_text(cfg) -> str:
    scheduler = cfg.tune.scheduler
    if scheduler.name != "asha":
        return "scheduler fifo: every trial runs all its epochs; a shorter bar is a trial that failed"
    unit = "epoch" if scheduler.time_attr == "epochs" else "optimizer step"
    unit += "" if scheduler.grace_period == 1 else "s"
    return (f"ASHA: every trial runs {scheduler.grace_period} {unit} before it can be stopped; at each rung "
            f"(grace period times {scheduler.reduction_factor:g}^k) only the best 1/{scheduler.reduction_factor:g} "
            "go on, so a short orange bar is a trial ASHA stopped there")
