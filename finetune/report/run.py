"""A run's report.html, built from its run directory alone (config.yaml, summary.json,
metrics.jsonl, best/ and test_results/), so `finetune report RUN_DIR` redraws it any time."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np

from finetune import config as config_module
from finetune import files
from finetune.data import token_lengths
from finetune.report import figures
from finetune.report.html import figure, notes, page, paragraph, preformatted, section, table
from finetune.tasks import Task, task_from_json
from finetune.training.record import TEST_RESULTS

def run_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no summary.json: not a finished run (a report needs one)")
    cfg = config_module.load_saved(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = files.read_json_lines(run_dir / "metrics.jsonl")
    task = _saved_task(run_dir / "best")
    rows, mistakes = _test_results(run_dir)
    metric = cfg.checkpoint.metric
    sections = [
        _result(summary, task, metric),
        *([_strategy_race(summary["strategy_race"])] if summary.get("strategy_race") else []),
        section("Learning curves",
                figure(figures.learning_curves(epochs, metric, summary.get("best_epoch")),
                       "train loss is measured while training (dropout, augmentation); train-eval scores a fixed "
                       "sample of training rows in eval mode, as val is scored: a wide gap between train-eval and "
                       "val is overfitting", "learning curves") if epochs else paragraph("no epoch finished"),
                anchor="curves"),  # fmt: skip
    ]
    if task is not None and rows:
        sections += _test_sections(task, rows)
        if mistakes:
            sections.append(_mistakes(task, mistakes))
    elif task is not None:
        sections.append(section("Test split", paragraph("no per-row test results in this run directory (no test "
                                                        "split, or a run from before reports)")))  # fmt: skip
    sections += [_layer_groups(summary), _data(summary), section("Resolved pipeline", preformatted(
        (run_dir / "config.yaml").read_text()), anchor="config")]  # fmt: skip
    chosen = " (chosen by strategy.name=auto)" if summary.get("strategy_race") else ""
    subtitle = (f"{cfg.task.type} · model {cfg.model.name} · strategy {cfg.strategy.name}{chosen} · "
                f"{summary.get('train_rows')} training rows · {summary.get('epochs_run')} of {summary.get('epochs')} "
                f"epochs · {summary.get('wall_s', 0):.0f} s · {run_dir}")  # fmt: skip
    return page(f"finetune run: {cfg.name}", subtitle, sections)


def _saved_task(best: Path) -> Task | None:
    if not (best / "labels.json").is_file():
        return None
    state = json.loads((best / "task.json").read_text()) if (best / "task.json").is_file() else {"type": "classification"}
    return task_from_json(state, json.loads((best / "labels.json").read_text()))


def _test_results(run_dir: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    folder = run_dir / TEST_RESULTS
    if not (folder / "rows.npz").is_file():
        return {}, []
    with np.load(folder / "rows.npz") as saved:
        rows = {name: saved[name] for name in saved.files}
    if "target" not in rows or not len(rows["target"]):
        return {}, []
    mistakes = json.loads((folder / "mistakes.json").read_text()) if (folder / "mistakes.json").is_file() else []
    return rows, mistakes


def _result(summary: dict, task: Task | None, metric: str) -> str:
    """The test metrics of the fine-tuned model beside the pretrained one (new head) and a constant
    predictor, with the run's warnings: is this model better than doing nothing?"""
    names = task.metric_names if task else sorted({k.split("_", 1)[1] for k in summary if k.startswith("test_")})
    stick = summary.get("yardstick")
    rows = [[name, summary.get(f"test_{name}"), summary.get(f"baseline_test_{name}"), summary.get(f"constant_test_{name}")]
            + ([summary.get(f"yardstick_test_{name}")] if stick else [])
            for name in names if f"test_{name}" in summary]  # fmt: skip
    warnings = summary.get("warnings") or []
    verdict = (notes(warnings) if warnings else
               notes(["no warning: the fine-tuned model beats the pretrained one and a constant predictor on test"
                      + (", and the yardstick by more than the noise" if stick else "") + "; val stays near train-eval"],
                     "ok"))  # fmt: skip
    best = summary.get("best_val_metric") or {}
    facts = (f"best epoch {summary['best_epoch'] + 1} by {metric} = {best.get(metric, float('nan')):.4g}; "
             f"{summary.get('test_samples', '?')} test rows" if summary.get("best_epoch") is not None else "")
    if stick:
        facts += (f"; yardstick: {stick['description']}, {stick['setting']}, fit on {stick['train_rows']:,} training rows "
                  f"in {stick['seconds']:.0f} s")  # fmt: skip
    if summary.get("token_lengths"):
        facts += f"; {token_lengths.describe(summary['token_lengths'])}"
    headers = ["test metric", "fine-tuned", "pretrained, new head only", "constant predictor"] + (["yardstick"] if stick else [])
    return section("Result on test", verdict, table(headers, rows, marked={0}), paragraph(facts) if facts else "",
                   anchor="result")  # fmt: skip


def _test_sections(task: Task, rows: dict[str, np.ndarray]) -> list[str]:
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    labels = task.label_names
    if task.type == "classification":
        target, prediction = rows["target"], rows["prediction"]
        precision, recall, f1, support = precision_recall_fscore_support(
            target, prediction, labels=list(range(len(labels))), zero_division=0)  # fmt: skip
        per_class = [[labels[i], precision[i], recall[i], f1[i], int(support[i])] for i in range(len(labels))]
        correct = (target == prediction).astype(float)
        png, ece = figures.reliability_diagram(rows["confidence"].astype(float), correct)
        return [
            section("Confusion matrix", figure(figures.confusion_matrix(target, prediction, labels),
                                               "where each true class's test rows went", "confusion matrix"),
                    anchor="confusion"),  # fmt: skip
            section("Per class", table(["class", "precision", "recall", "F1", "support (test rows)"], per_class),
                    anchor="per-class"),
            section("Calibration", figure(png, f"expected calibration error {ece:.3f}: how far the predicted "
                                               "class's probability is from how often it is right",
                                          "reliability diagram"), anchor="calibration"),  # fmt: skip
        ]
    if task.type == "multi_label":
        target, probability = rows["target"], rows["probability"]
        predicted = task.predicted(probability)
        precision, recall, f1, support = precision_recall_fscore_support(target, predicted, zero_division=0)
        per_label = []
        for i, name in enumerate(labels):
            ap = average_precision_score(target[:, i], probability[:, i]) if target[:, i].any() else None
            per_label.append([name, task.thresholds[i], precision[i], recall[i], f1[i], ap, int(support[i])])
        headers = ["label", "threshold", "precision", "recall", "F1", "average precision", "support (test rows)"]
        return [section("Per label", table(headers, per_label), anchor="per-label")]
    if task.type == "regression":
        png = figures.regression_errors(rows["target"].astype(float), rows["prediction"].astype(float), labels[0])
        return [section("Errors", figure(png, "each dot one test row; the dashed line is a perfect prediction",
                                         "predicted vs true"), anchor="errors")]  # fmt: skip
    return []


def _mistakes(task: Task, mistakes: list[dict]) -> str:
    cards = []
    for mistake in mistakes:
        shown = (f'<img alt="test input" src="{mistake["image"]}">' if "image" in mistake
                 else f'<div class="input">{escape(mistake.get("text", ""))}</div>')  # fmt: skip
        cards.append(f'<div class="card">{shown}<div>true: <b class="good">{escape(mistake["true"])}</b></div>'
                     f'<div>predicted: <b class="bad">{escape(mistake["predicted"])}</b></div>'
                     f'<div>{escape(mistake["score"])}</div></div>')  # fmt: skip
    what = "the texts as the model read them (tokens decoded)" if "text" in mistakes[0] else "the images as the model saw them"
    return section(f"{task.mistakes_title} on test", paragraph(f"the worst {len(mistakes)}, worst first; {what}"),
                   '<div class="cards">' + "".join(cards) + "</div>", anchor="mistakes")  # fmt: skip


def _strategy_race(race: dict) -> str:
    """strategy.name=auto: every candidate at each rung, what it cost, and why the winner won."""
    rungs = race["racing_rungs"]
    rows = []
    for entry in race["candidates"]:  # best first
        seconds = entry["epoch_seconds"]
        rows.append([entry["label"], *(entry["scores"].get(str(r), "") for r in rungs), entry["trainable_params"],
                     round(sum(seconds) / len(seconds), 1) if seconds else "", round(entry["peak_memory_mb"] or 0),
                     entry["outcome"]])  # fmt: skip
    winner = next(i for i, e in enumerate(race["candidates"]) if e["id"] == race["winner"])
    said = [f"winner: {race['candidates'][winner]['label']}; {race['margin_over_full']}"]
    if race.get("cheaper_runner_up"):
        said.append(f"runner-up that costs less: {race['cheaper_runner_up']}")
    said.append(f"{race['candidate_epochs']} candidate-epochs of a budget of {race['budget_epochs']:g} in "
                f"{race.get('wall_s', 0):.0f} s; the winner then trained on from its race checkpoint (the curves above)")  # fmt: skip
    headers = ["candidate", *(f"{race['metric']} at epoch {r}" for r in rungs), "trainable params", "s/epoch",
               "peak memory MB", "outcome"]  # fmt: skip
    return section("How the strategy was chosen", notes(said), table(headers, rows, marked={winner}), anchor="race")


def _layer_groups(summary: dict) -> str:
    groups = summary.get("layer_groups") or []
    rows = [[g["group"], "frozen" if g["lr"] is None else g["lr"], g["params"], g["trainable_now"]] for g in groups]
    return section("Layer groups (input to output)",
                   table(["group", "learning rate", "parameters", "trainable at the start"], rows) if rows
                   else paragraph("not recorded"), anchor="layer-groups")  # fmt: skip


def _data(summary: dict) -> str:
    skipped = summary.get("skipped_rows") or {}
    parts = [paragraph(f"{summary.get('train_rows')} training rows; {summary.get('test_samples', '?')} test rows")]
    if skipped:
        parts.append(notes(["skipped bad rows (data.on_bad_rows=skip): "
                            + ", ".join(f"{n} in {split}" for split, n in skipped.items())]))  # fmt: skip
        parts.append(table(["example"], [[e] for e in summary.get("skipped_row_examples", [])]))
    else:
        parts.append(paragraph("no row was skipped"))
    phases = summary.get("phases_s") or {}
    if phases:
        parts.append(table(["where the time went", "seconds"], [[k, v] for k, v in phases.items()]))
    return section("Data and time", *parts, anchor="data")
