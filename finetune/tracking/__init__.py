"""Experiment trackers: the run's events (training/events.py) logged to TensorBoard, MLflow and
Weights & Biases by the driver, the one process that sees the whole run. Rank 0 alone sends
events, so one run is one tracker run whatever the number of workers. A restarted worker group
or `--resume` continues it: the run folder's tracking.json keeps the tracker runs' ids and the
last step and epoch logged, and what was logged is not logged again (steps and an epoch
retrained after a restart keep the values first logged; metrics.jsonl keeps the retrained).

Every metric is logged against the optimizer step: every train.log_every_steps steps the mean
loss of those steps (step/loss), the speed (step/samples_per_s) and the learning rate of each
layer group (lr/<group>); each epoch's metrics.jsonl line at the step the epoch ended; the
baseline at step 0 and the test metrics at the last step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from finetune import files
from finetune.training.events import Baseline, EpochEnded, FinalTest, RunEvent, StepProgress

if TYPE_CHECKING:
    from finetune.config import PipelineConfig, TrackingConfig

STATE_FILE = "tracking.json"
# metrics.jsonl keys that say where an epoch sits rather than measure it
_BOOKKEEPING = {"epoch", "epochs_done", "steps_done", "best_epoch", "early_stopped"}


def flat_params(cfg: PipelineConfig) -> dict[str, object]:
    """The resolved pipeline as dotted keys (`optim.lr`), lists as their JSON text."""
    out: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list) else value

    walk("", cfg.model_dump(mode="json", exclude={"tune"}))
    return out


class Tracking:
    """The run's trackers, as one subscriber of its events (`training.events.Subscriber`)."""

    def __init__(self, trackers: list, state_path: Path, state: dict) -> None:
        self.trackers, self.state_path, self.state = trackers, state_path, state
        self.step = state.get("last_step", 0)  # where the test metrics go: the run's last step

    def on_work(self, progress) -> None:
        """What rank 0 is doing between steps: for the terminal only."""

    def on_step(self, progress: StepProgress) -> None:
        if progress.global_step <= self.state.get("last_step", -1):
            return
        metrics = {"step/loss": progress.recent_loss, "step/samples_per_s": progress.samples_per_s}
        metrics.update({f"lr/{group}": lr for group, lr in progress.lrs.items()})
        self._log(metrics, progress.global_step, last_step=progress.global_step)

    def on_event(self, event: RunEvent) -> None:
        if isinstance(event, Baseline) and not self.state.get("baseline_logged"):
            self._log(event.metrics, 0, baseline_logged=True)
        elif isinstance(event, EpochEnded) and event.epoch > self.state.get("last_epoch", -1):
            metrics = {k: v for k, v in event.metrics.items() if k not in _BOOKKEEPING}
            self.step = max(self.step, event.metrics["steps_done"])
            self._log({**metrics, "epoch": event.metrics["epochs_done"]}, self.step, last_epoch=event.epoch)
        elif isinstance(event, FinalTest):
            self._log({k: v for k, v in event.metrics.items() if k.startswith(("test/", "constant_test/"))}, self.step)

    def finish(self, summary: dict, best_dir: Path | None) -> None:
        for tracker in self.trackers:
            tracker.finish(summary, best_dir)

    def fail(self, interrupted: bool) -> None:
        for tracker in self.trackers:
            tracker.fail(interrupted)

    def _log(self, metrics: dict, step: int, **high_water) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if _is_number(v) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(metrics, step)
        if high_water:
            self.state.update(high_water)
            files.write_text(self.state_path, json.dumps(self.state))


def _read_state(path: Path, resume: bool) -> dict:
    """The tracker runs (ids, last step and epoch logged) a resumed run continues; {} for a new one."""
    return json.loads(path.read_text()) if resume and path.is_file() else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def start_tracking(cfg: PipelineConfig, run_dir: Path, resume: bool, sweep: dict | None = None) -> Tracking:
    """The trackers `cfg.tracking` asks for, each with a run of its own, or (`resume`) the runs
    this run folder logged to before. `sweep`: the trial of a sweep (`SweepTracking.for_trials`):
    its MLflow run nested under the sweep's, its W&B run in the sweep's group."""
    state_path = run_dir / STATE_FILE
    state = _read_state(state_path, resume)
    sweep = sweep or {}
    trackers = []
    tracking = cfg.tracking
    if tracking.tensorboard:
        from finetune.tracking.tensorboard import TensorBoardTracker

        trackers.append(TensorBoardTracker(run_dir / "tensorboard", cfg))
    if tracking.mlflow is not None:
        from finetune.tracking.mlflow import MlflowTracker

        trackers.append(MlflowTracker(tracking.mlflow, cfg, run_dir, state, parent=sweep.get("mlflow")))
    if tracking.wandb is not None:
        from finetune.tracking.wandb import WandbTracker

        trackers.append(WandbTracker(tracking.wandb, cfg, run_dir, state, group=sweep.get("wandb_group")))
    files.write_text(state_path, json.dumps(state))
    return Tracking(trackers, state_path, state)


class SweepTracking:
    """A sweep's side: the MLflow run its trials nest under (the base pipeline and the search
    space as its parameters, the best trial's metrics and model at the end) and the W&B group
    of its trials. SWEEP_DIR/tracking.json keeps the parent's id for --resume."""

    def __init__(self, cfg: PipelineConfig, sweep_dir: Path, resume: bool) -> None:
        self.state_path = sweep_dir / STATE_FILE
        self.state = _read_state(self.state_path, resume)
        self.mlflow = None
        if cfg.tracking.mlflow is not None:
            from finetune.tracking.mlflow import MlflowTracker

            self.mlflow = MlflowTracker(cfg.tracking.mlflow, cfg, sweep_dir, self.state)
            space = json.dumps(cfg.tune.model_dump(mode="json", exclude_none=True)["search_space"])
            self.mlflow.client.log_param(self.mlflow.run_id, "tune.search_space", space)
        self.wandb_group = sweep_dir.name if cfg.tracking.wandb is not None else None
        files.write_text(self.state_path, json.dumps(self.state))

    def for_trials(self) -> dict:
        """What each trial's `start_tracking(sweep=...)` needs (plain values: it travels to the trial's actor)."""
        parent = {"run_id": self.mlflow.run_id, "tracking_uri": self.mlflow.tracking_uri} if self.mlflow else None
        return {"mlflow": parent, "wandb_group": self.wandb_group}

    def finish(self, summary: dict, best_dir: Path | None, outcomes: dict[str, str]) -> None:
        """`outcomes`: trial id -> finished, stopped_early (by the scheduler) or errored."""
        if self.mlflow is None:
            return
        best = summary.get("best") or {}
        self.mlflow.log({k: v for k, v in best.items() if _is_number(v) and "/" in k}, 0)
        self.mlflow.close_children(outcomes)
        self.mlflow.finish(summary, best_dir)

    def fail(self, interrupted: bool) -> None:
        if self.mlflow is not None:
            self.mlflow.fail(interrupted)


EXTRAS = {"mlflow": ("mlflow", "MLflow"), "wandb": ("wandb", "Weights & Biases")}  # tracker: (module, name)


def check_tracking(cfg: TrackingConfig) -> list[str]:
    """A tracker asked for but not installed: say which extra brings it, before anything starts."""
    import importlib.util

    return [
        f'tracking.{tracker} needs {name}: pip install "finetune[{tracker}]" (in a checkout: pip install -e ".[{tracker}]")'
        for tracker, (module, name) in EXTRAS.items()
        if getattr(cfg, tracker) is not None and importlib.util.find_spec(module) is None
    ]
