"""The run's typed events folded by the driver (RunRecord) and drawn by the progress display,
on events built by hand: no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from finetune.report.progress import TrainingProgress, phases_line
from finetune.training.events import (
    Baseline, BatchNormPlan, EpochEnded, EventSink, FinalTest, LayerGroups, StepProgress, WorkerPhases, WorkerStarted,
    WorkProgress,
)  # fmt: skip
from finetune.training.phases import PHASES, PhaseClock, run_phases
from finetune.training.record import RunRecord
from helpers import pipeline_config


def epoch(number: int, accuracy: float) -> EpochEnded:
    return EpochEnded({"epoch": number, "train/loss": 0.5, "train/samples": 100, "train/samples_per_s": 50.0,
                       "train/seconds": 2.0, "val/accuracy": accuracy, "best_epoch": number})  # fmt: skip


def start(rank: int, start_epoch: int) -> WorkerStarted:
    return WorkerStarted(rank, start_epoch, node_id=f"node-{rank}", hostname="host", pid=100 + rank)


def test_a_restarted_run_is_folded_once_per_epoch_and_counted(tmp_path):
    metrics_path = tmp_path / "metrics.jsonl"
    record = RunRecord(metrics_path)
    events = [
        LayerGroups([{"group": "head", "lr": 1e-3, "params": 10, "trainable_now": 10}]),
        BatchNormPlan("BatchNorm: 2 layers, 2 trained", 2), start(0, 0), start(1, 0),
        Baseline({"baseline_test/accuracy": 0.4}), epoch(0, 0.7), epoch(1, 0.8),
        # a worker died: the group restarts from epoch 1's checkpoint and resends the epochs before it
        start(0, 2), start(1, 2), epoch(0, 0.7), epoch(1, 0.8), epoch(2, 0.9),
        FinalTest({"test/accuracy": 0.88, "constant_test/accuracy": 0.5, "baseline_test/accuracy": 0.4}),
    ]  # fmt: skip
    kept = [event for event in events if record.fold(event)]
    assert len(kept) == len(events) - 2  # the two resent epochs
    record.close()
    assert [json.loads(line)["epoch"] for line in metrics_path.read_text().splitlines()] == [0, 1, 2]

    summary = record.summary(pipeline_config(train={"epochs": 3}), train_rows=100, wall_s=9.0, phases_s={},
                             run_dir=tmp_path, has_best=True, skipped={})  # fmt: skip
    assert summary["restarts"] == 1 and summary["restart_epochs"] == [2] and summary["resumed_from_epoch"] == 0
    assert [w["node_id"] for w in summary["workers"]] == ["node-0", "node-1"]
    assert summary["best_epoch"] == 2 and summary["best_val_metric"] == {"val/accuracy": 0.9}
    assert (summary["test_accuracy"], summary["constant_test_accuracy"], summary["baseline_test_accuracy"]) == (0.88, 0.5, 0.4)
    assert summary["batchnorm"]["plan"] == "BatchNorm: 2 layers, 2 trained"
    assert summary["train_samples_per_s"] == 300 / 6.0

    # a resumed driver keeps the epochs it wrote; an epoch trained again replaces its line
    again = RunRecord(metrics_path)
    assert again.fold(epoch(2, 0.95)) and not again.fold(epoch(1, 0.8))
    again.close()
    assert [json.loads(line)["val/accuracy"] for line in metrics_path.read_text().splitlines()] == [0.7, 0.8, 0.95]


def test_the_wall_time_splits_into_phases_that_add_up():
    """The driver's clock around the worker group's: the gaps between them are the worker group
    starting and shutting down; what neither clock saw is "other"."""
    driver = PhaseClock()
    driver.add("ray_start", 1.0)
    driver.add("read_data", 2.0)
    fit_started = driver.started_at + 3.5
    worker = WorkerPhases(started_at=fit_started + 6.0, ended_at=fit_started + 6.0 + 10.0,
                          seconds={"model_setup": 3.0, "baseline": 1.0, "data_start": 0.5, "training": 4.0,
                                   "evaluation": 0.5, "checkpoints": 0.5, "test": 0.25})  # fmt: skip
    fit_ended = worker.ended_at + 1.5
    driver.add("export", 0.25)
    phases = run_phases(driver, fit_started, fit_ended, worker, wall_s=fit_ended - driver.started_at + 0.5)
    assert list(phases) == [p for p in PHASES if p in phases]  # in run order
    assert phases["worker_group_start"] == 6.0 and phases["shutdown"] == 1.5
    # the driver's 0.5 s before fit() that its clock did not time, the worker loop's untimed 0.25 s, the tail's 0.25 s
    assert phases["other"] == pytest.approx(1.0)
    assert sum(phases.values()) == pytest.approx(fit_ended - driver.started_at + 0.5)
    line = phases_line(phases)
    assert line.startswith("time: ray start 1.0 s, read data 2.0 s, worker group start 6.0 s (") and "training 4.0 s" in line
    # a run whose worker group never sent its phases (it diverged): fit() as one phase
    assert run_phases(driver, fit_started, fit_ended, None, wall_s=30.0)["training"] == pytest.approx(17.5, abs=0.01)

    record = RunRecord(Path("/nonexistent/metrics.jsonl"))
    assert record.fold(worker) and record.phases == worker


def test_the_progress_display_draws_what_the_events_say():
    console = Console(record=True, width=120)
    with TrainingProgress(console, epochs=2, steps_per_epoch=4) as progress:
        progress.on_step(StepProgress(epoch=0, step=2, steps=4, loss=0.6931, samples_per_s=12.5, recent_loss=0.69, lrs={}))
        progress.on_event(LayerGroups([{"group": "encoder", "lr": None, "params": 1000, "trainable_now": 0}]))
        progress.on_event(Baseline({"baseline_test/accuracy": 0.5, "baseline_test/samples": 10}))
        progress.on_event(EpochEnded({**epoch(0, 0.75).metrics, "train_eval/accuracy": 0.8}))
    text = console.export_text()
    assert "encoder" in text and "frozen" in text and "1,000" in text
    assert "baseline (new head only): test accuracy 0.5000" in text and "samples" not in text.split("baseline")[1].split("\n")[0]
    assert "epoch 1/2: train loss 0.5000, train-eval accuracy 0.8000, val accuracy 0.7500, 50.0 samples/s" in text


def test_the_progress_bar_says_what_the_run_does_between_steps():
    """Evaluation, recalibration and start-up move no step: the bar names them, with rows so far."""
    console = Console(record=True, width=200, force_terminal=True)
    with TrainingProgress(console, epochs=1, steps_per_epoch=4) as progress:
        shown = []
        for update in (lambda: None, lambda: progress.on_event(start(0, 0)), lambda: progress.on_work(WorkProgress("baseline on test", 0)),
                       lambda: progress.on_work(WorkProgress("validating", 640)),
                       lambda: progress.on_step(StepProgress(0, 1, 4, 0.6, 10.0, 0.6, {}))):  # fmt: skip
            update()
            shown.append(progress.progress.tasks[0].fields["doing"])
    assert shown == ["starting the workers", "setting up the model", "baseline on test", "validating: 640 rows", "training"]


def test_rank_zero_sends_the_run_events_and_every_rank_its_start(ray_session):
    from finetune.training.monitor import RunMonitor

    for rank in (0, 1):
        monitor = RunMonitor.remote()
        sink = EventSink(monitor, rank)
        sink.emit(start(rank, 0))
        sink.step(StepProgress(0, 1, 4, 0.5, 10.0, 0.5, {"head": 1e-3}))
        sink.emit(epoch(0, 0.7))
        items = ray_session.get(monitor.poll.remote(0))  # in the order sent
        assert items == ([start(rank, 0), StepProgress(0, 1, 4, 0.5, 10.0, 0.5, {"head": 1e-3}), epoch(0, 0.7)] if rank == 0 else [start(rank, 0)])
        assert ray_session.get(monitor.poll.remote(len(items))) == []
        ray_session.kill(monitor)


def test_a_report_waits_until_the_driver_has_handled_the_events_before_it(ray_session):
    """What keeps a sweep trial's record whole when Tune stops the trial at the report it sees."""
    from finetune.training.monitor import RunMonitor

    monitor = RunMonitor.remote()
    EventSink(monitor, 0).emit(epoch(0, 0.7))  # returns once the monitor holds it
    assert ray_session.get(monitor.wait_handled.remote(0.2)) is False  # the driver has not polled yet
    waiting = monitor.wait_handled.remote(30.0)
    (items,) = [ray_session.get(monitor.poll.remote(0))]
    monitor.mark_handled.remote(len(items))
    assert ray_session.get(waiting) is True
    ray_session.kill(monitor)
