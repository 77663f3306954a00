"""report.html and `finetune report`, without Ray: a run folder written by the driver's own record
(`RunRecord`) from events built here, drawn, and opened in headless Chromium. The reports of
real runs and sweeps are checked in the end-to-end tests (test_train, test_tasks, test_tune)."""

from __future__ import annotations

import json

import numpy as np
import torch

from browser import check_report
from finetune import config as config_module
from finetune.cli import main
from finetune.report import write_report
from finetune.report.figures import expected_calibration_error
from finetune.tasks import task_class
from finetune.training.events import EpochEnded, FinalTest, LayerGroups
from finetune.training.record import RunRecord
from helpers import pipeline_config

LABELS = ["cat", "dog", "outdoor"]


def _multi_label_run(tmp_path):
    """A multi-label run folder as the driver leaves it: 3 epochs, test rows, thresholds per label."""
    cfg = pipeline_config(name="tags", task={"type": "multi_label", "threshold": [0.5, 0.3, 0.7]}, train={"epochs": 3})
    task = task_class("multi_label").from_config(cfg.task, LABELS, None)
    run_dir = tmp_path / "run"
    (run_dir / "best").mkdir(parents=True)
    config_module.save(cfg, run_dir / "config.yaml")
    (run_dir / "best" / "labels.json").write_text(json.dumps(LABELS))
    (run_dir / "best" / "task.json").write_text(json.dumps(task.to_json()))
    rng = np.random.default_rng(0)
    target = (rng.random((200, 3)) < [0.5, 0.3, 0.2]).astype(np.uint8)
    probability = np.clip(target * 0.6 + rng.random((200, 3)) * 0.5, 0, 1).astype(np.float32)
    rows = {"loss": torch.from_numpy(rng.random(200).astype(np.float32)), "target": torch.from_numpy(target),
            "probability": torch.from_numpy(probability)}  # fmt: skip
    record = RunRecord(run_dir / "metrics.jsonl")
    record.fold(LayerGroups([{"group": "embeddings", "lr": None, "params": 1000, "trainable_now": 0},
                             {"group": "head", "lr": 1e-3, "params": 99, "trainable_now": 99}]))  # fmt: skip
    for epoch in range(3):
        metrics = {"epoch": epoch, "epochs_done": epoch + 1, "train/loss": 0.7 - 0.1 * epoch, "train/samples": 100,
                   "train/seconds": 1.0, **task.metrics(rows, "val"), **task.metrics(rows, "train_eval"), "best_epoch": epoch}  # fmt: skip
        record.fold(EpochEnded(metrics))
    order = task.mistake_order({k: v.numpy() for k, v in rows.items()})
    worst = [int(i) for i in np.argsort(-np.nan_to_num(order, nan=-1))[:3]]
    mistakes = [{**task.row_in_words({k: v[i].numpy() for k, v in rows.items()}), "text": f"row {i} <b>as read</b>"}
                for i in worst]  # fmt: skip
    record.fold(FinalTest({**task.metrics(rows, "test"), **task.constant_metrics(rows, "test")},
                          {k: v.numpy() for k, v in rows.items()}, mistakes))  # fmt: skip
    record.close()
    summary = record.summary(cfg, train_rows=300, wall_s=12.0, phases_s={"training": 10.0}, run_dir=run_dir,
                             has_best=True, skipped={"counts": {"train": 2}, "examples": ["a.csv, row 7: empty label"]})  # fmt: skip
    summary["warnings"] = []
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir, task, target, probability


def test_a_multi_label_run_report_shows_each_labels_f1_at_its_threshold_in_chromium(tmp_path):
    run_dir, task, target, probability = _multi_label_run(tmp_path)
    assert (run_dir / "test_results" / "rows.npz").is_file()  # the record keeps what the report draws
    path = write_report(run_dir)
    opened = check_report(path, {"learning curves"})
    from sklearn.metrics import f1_score

    predicted = (probability >= np.array([0.5, 0.3, 0.7])).astype(np.uint8)
    for i, name in enumerate(LABELS):  # label, threshold, precision, recall, F1 as the page shows them
        row = next(line for line in opened.text.splitlines() if line.startswith(name + "\t"))
        cells = row.split("\t")
        assert float(cells[1]) == task.thresholds[i]
        assert float(cells[4]) == float(f"{f1_score(target[:, i], predicted[:, i]):.4g}")
    assert "embeddings\tfrozen" in opened.text and "head\t0.001" in opened.text  # the layer-group table
    assert "a.csv, row 7: empty label" in opened.text and "2 in train" in opened.text  # skipped rows
    assert "<b>as read</b>" in opened.text  # an input's text shown as written, not as markup
    assert "name: tags" in opened.text  # the resolved pipeline


def test_finetune_report_redraws_a_run_and_names_a_folder_that_is_neither(tmp_path, capsys):
    run_dir, *_ = _multi_label_run(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    assert f"report: {run_dir / 'report.html'}" in capsys.readouterr().out.replace("\n", "")
    assert "Per label" in (run_dir / "report.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "is neither a run directory (config.yaml) nor a sweep directory (results.csv)" in capsys.readouterr().out


def test_expected_calibration_error_is_the_weighted_gap_between_confidence_and_accuracy():
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=float)
    ece, bins = expected_calibration_error(confidence, correct, bins=10)
    # bin 0.9-1.0: 4 rows, accuracy 0.75 vs 0.95; bin 0.5-0.6: 2 rows, 0.5 vs 0.55
    assert abs(ece - (4 / 6 * 0.2 + 2 / 6 * 0.05)) < 1e-9
    assert [(b["rows"], b["accuracy"]) for b in bins] == [(2, 0.5), (4, 0.75)]
