"""Experiment trackers fed the run's events by hand (no Ray), read back through each tracker's
own reader: TensorBoard's event reader, MlflowClient, W&B's offline run file."""

from __future__ import annotations

import importlib.util
import json

import pytest

from finetune.config import ConfigError
from finetune.config import TrackingConfig
from finetune.tracking import check_tracking, start_tracking
from finetune.training.events import Baseline, EpochEnded, FinalTest, StepProgress
from helpers import mlflow_history, pipeline_config, tensorboard_scalars, wandb_history, wandb_offline_records

STEPS = 4  # optimizer steps per epoch


def _epoch(epoch: int, val_accuracy: float) -> EpochEnded:
    return EpochEnded({"epoch": epoch, "epochs_done": epoch + 1, "steps_done": (epoch + 1) * STEPS, "best_epoch": epoch,
                       "train/loss": 0.6 - epoch / 10, "val/accuracy": val_accuracy, "val/loss": 0.5 - epoch / 10})  # fmt: skip


def _steps(epoch: int) -> list[StepProgress]:
    return [StepProgress(epoch, step, STEPS, loss=0.7, samples_per_s=50.0, recent_loss=0.7 - (epoch * STEPS + step) / 100,
                         lrs={"body": 1e-4 * step, "head": 1e-3 * step}) for step in (2, 4)]  # fmt: skip


def _feed(tracking, epochs: range, baseline: bool = True) -> None:
    if baseline:
        tracking.on_event(Baseline({"baseline_test/accuracy": 0.5}))
    for epoch in epochs:
        for progress in _steps(epoch):
            tracking.on_step(progress)
        tracking.on_event(_epoch(epoch, 0.7 + epoch / 10))


def test_every_tracker_logs_the_same_metrics_at_the_same_steps_and_a_resumed_run_continues(tmp_path):
    cfg = pipeline_config(name="tracked", tracking={"mlflow": {}, "wandb": {"mode": "offline"}})
    run_dir = tmp_path / "runs" / "first"
    run_dir.mkdir(parents=True)
    tracking = start_tracking(cfg, run_dir, resume=False)
    _feed(tracking, range(2))
    tracking.fail(interrupted=True)  # the driver stopped after epoch 2 of 3 (Ctrl-C)

    # --resume: the same tracker runs; the worker group resends epoch 2 and retrains from its checkpoint
    tracking = start_tracking(cfg, run_dir, resume=True)
    tracking.on_event(_epoch(1, 0.8))
    _feed(tracking, range(1, 3))  # epoch 2 again from its checkpoint's start, a resent baseline: not logged twice
    tracking.on_event(FinalTest({"test/accuracy": 0.85, "constant_test/accuracy": 0.5, "val/accuracy": 0.9}))
    tracking.finish({"test_accuracy": 0.85, "epochs_run": 3}, best_dir=None)

    expected = {
        "baseline_test/accuracy": {0: 0.5},
        "val/accuracy": {4: 0.7, 8: 0.8, 12: 0.9},
        "train/loss": {4: 0.6, 8: 0.5, 12: 0.4},
        "epoch": {4: 1, 8: 2, 12: 3},
        "step/loss": {step: 0.7 - step / 100 for step in (2, 4, 6, 8, 10, 12)},
        "lr/head": {step: 1e-3 * (2 if step % 4 else 4) for step in (2, 4, 6, 8, 10, 12)},
        "test/accuracy": {12: 0.85},
        "constant_test/accuracy": {12: 0.5},
    }
    state = json.loads((run_dir / "tracking.json").read_text())
    logged = {
        "tensorboard": tensorboard_scalars(run_dir / "tensorboard"),
        "mlflow": mlflow_history(state["mlflow_tracking_uri"], state["mlflow_run_id"]),  # also: no step twice
        "wandb": wandb_history(run_dir),
    }
    for tracker, history in logged.items():
        for name, values in expected.items():
            assert history[name] == pytest.approx(values, rel=1e-6), (tracker, name, history[name])
        assert "epochs_done" not in history and "best_epoch" not in history  # where an epoch sits, not a measurement

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])  # one run, resumed
    assert run.info.run_id == state["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "first" and run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert state["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # beside the run folders
    assert not list(tmp_path.glob("mlruns"))  # no artifacts in the working directory
    assert len({path.parent.name for path in run_dir.glob("wandb/offline-run-*/run-*.wandb")}) == 2  # one W&B id, twice
    assert {path.stem.removeprefix("run-") for path in run_dir.glob("wandb/offline-run-*/run-*.wandb")} == {state["wandb_run_id"]}
    hparams = tensorboard_scalars(run_dir / "tensorboard" / "hparams")
    assert hparams["hparam/test_accuracy"] == pytest.approx({0: 0.85})


class _DriverKilled(Exception):
    pass


class _KilledHere:
    """A subscriber at which the driver dies while handing out epoch 2."""

    def on_event(self, event) -> None:
        if isinstance(event, EpochEnded) and event.epoch == 1:
            raise _DriverKilled


@pytest.mark.parametrize("killed", ["before_trackers", "after_trackers"])
def test_an_epoch_a_killed_driver_was_handing_out_is_logged_once_on_resume(tmp_path, killed):
    """A driver killed while handing out epoch 2 (a sweep's trial actor dies with its sweep's
    driver), before or after its trackers logged it: its record does not hold epoch 2 yet, so the
    resumed run's worker group, which resends the epochs before its checkpoint, hands epoch 2 to
    the trackers again, and they hold it once."""
    from finetune.training.driver import hand_out
    from finetune.training.record import RunRecord

    cfg = pipeline_config(name="tracked", tracking={"mlflow": {}})
    run_dir = tmp_path / "runs" / "first"
    run_dir.mkdir(parents=True)
    record, tracking = RunRecord(run_dir / "metrics.jsonl"), start_tracking(cfg, run_dir, resume=False)
    subscribers = [_KilledHere(), tracking] if killed == "before_trackers" else [tracking, _KilledHere()]
    hand_out(_epoch(0, 0.7), record, subscribers)
    with pytest.raises(_DriverKilled):
        hand_out(_epoch(1, 0.8), record, subscribers)

    record, tracking = RunRecord(run_dir / "metrics.jsonl"), start_tracking(cfg, run_dir, resume=True)
    for epoch, val_accuracy in enumerate([0.7, 0.8, 0.9]):
        hand_out(_epoch(epoch, val_accuracy), record, [tracking])
    record.close()
    state = json.loads((run_dir / "tracking.json").read_text())
    history = mlflow_history(state["mlflow_tracking_uri"], state["mlflow_run_id"])  # fails on a step logged twice
    assert history["val/accuracy"] == pytest.approx({4: 0.7, 8: 0.8, 12: 0.9})
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_tracker_not_installed_is_a_config_error_naming_its_extra(monkeypatch):
    assert check_tracking(TrackingConfig()) == []  # TensorBoard alone needs nothing more
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert check_tracking(TrackingConfig(mlflow={}, wandb={"mode": "offline"})) == [
        'tracking.mlflow needs MLflow: pip install "finetune[mlflow]" (in a checkout: pip install -e ".[mlflow]")'
    ]
    with pytest.raises(ConfigError, match=r"tracking\.wandb\.mode"):
        pipeline_config(tracking={"wandb": {"mode": "sometimes"}})


def test_a_sweep_is_one_mlflow_run_with_a_nested_run_per_trial_and_one_wandb_group(tmp_path):
    from mlflow import MlflowClient

    from finetune.tracking import SweepTracking

    cfg = pipeline_config(name="swept", tracking={"mlflow": {}, "wandb": {"mode": "offline"}},
                          tune={"search_space": {"optim.lr": {"grid": [1e-3, 1e-4]}}})  # fmt: skip
    sweep_dir = tmp_path / "runs" / "swept-sweep"
    sweep_dir.mkdir(parents=True)
    sweep = SweepTracking(cfg, sweep_dir, resume=False)
    for trial in ("t1", "t2"):  # as each trial's Tune actor does
        trial_dir = sweep_dir / "trials" / trial
        trial_dir.mkdir(parents=True)
        tracking = start_tracking(cfg, trial_dir, resume=True, sweep=sweep.for_trials())
        _feed(tracking, range(1 if trial == "t2" else 2))
        if trial == "t1":
            tracking.finish({"test_accuracy": 0.8}, best_dir=None)
        # t2: the scheduler stopped it after its first epoch; Tune ended its process, nothing closed its runs
    sweep.finish({"best": {"trial": "t1", "val/accuracy": 0.8, "test/accuracy": 0.8}}, None,
                 {"t1": "finished", "t2": "stopped_early"})  # fmt: skip

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("swept").experiment_id])}
    assert set(runs) == {"swept-sweep", "t1", "t2"}
    parent = runs["swept-sweep"]
    assert json.loads(parent.data.params["tune.search_space"]) == {"optim.lr": {"grid": [1e-3, 1e-4]}}
    assert parent.info.status == "FINISHED" and parent.data.metrics["test/accuracy"] == 0.8
    assert {runs[t].data.tags["mlflow.parentRunId"] for t in ("t1", "t2")} == {parent.info.run_id}
    assert runs["t1"].info.status == "FINISHED" and runs["t1"].data.tags["finetune.stopped_early"] == "false"
    assert runs["t2"].info.status == "KILLED" and runs["t2"].data.tags["finetune.stopped_early"] == "true"
    assert mlflow_history(client.tracking_uri, runs["t2"].info.run_id)["val/accuracy"] == {4: pytest.approx(0.7)}
    groups = {r.run.run_group for t in ("t1", "t2") for r in wandb_offline_records(sweep_dir / "trials" / t)
              if r.WhichOneof("record_type") == "run"}  # fmt: skip
    assert groups == {"swept-sweep"}
