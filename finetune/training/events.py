"""The run's events: what the workers tell the driver while they train, as typed records.

A worker emits them (`EventSink`, through the run's monitor actor); the driver folds them
into metrics.jsonl and summary.json (`training.record.RunRecord`) and hands each to its
subscribers (the live progress display; trackers and reports next) as it arrives. When each
fires, in the order a run sees them:

  LayerGroups    rank 0, after setup: each layer group's learning rate and size
  BatchNormPlan  rank 0, after setup, when the model has BatchNorm layers: what happens to them
  WorkerStarted  every rank, at each start of the worker group (a restart after a failure again)
  Baseline       rank 0, before the first epoch: the pretrained model with its untrained head, on test
  EpochEnded     rank 0, after each epoch's validation, before its checkpoint; a restarted
                 worker group sends the epochs before its checkpoint again (the driver drops
                 the ones it has)
  Diverged       rank 0: the training loss became NaN or infinite; the run stops
  FinalTest      rank 0: the best epoch's weights on test: metrics, per-row results, worst mistakes
  WorkerPhases   rank 0, the run's last event: where this worker group's time went

StepProgress is apart: rank 0 sends one every train.log_every_steps optimizer steps (the
progress bar shows the latest; trackers log each). So is WorkProgress: what rank 0 is doing
between steps (evaluating, recalibrating), for the progress display. Plain dataclasses, no Ray: a subscriber can
be tested on events built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Protocol


class Event(StrEnum):
    LAYER_GROUPS = "layer_groups"
    BATCHNORM_PLAN = "batchnorm_plan"
    WORKER_STARTED = "worker_started"
    BASELINE = "baseline"
    EPOCH_ENDED = "epoch_ended"
    DIVERGED = "diverged"
    FINAL_TEST = "final_test"
    WORKER_PHASES = "worker_phases"


@dataclass(frozen=True)
class LayerGroups:
    kind: ClassVar[Event] = Event.LAYER_GROUPS
    every_rank: ClassVar[bool] = False
    rows: list[dict]  # input -> output: group, lr (None: frozen for good), params, trainable_now


@dataclass(frozen=True)
class BatchNormPlan:
    kind: ClassVar[Event] = Event.BATCHNORM_PLAN
    every_rank: ClassVar[bool] = False
    text: str  # one line, as `finetune validate` prints it
    layers: int  # BatchNorm layers that track statistics in training


@dataclass(frozen=True)
class WorkerStarted:
    kind: ClassVar[Event] = Event.WORKER_STARTED
    every_rank: ClassVar[bool] = True
    rank: int
    start_epoch: int  # 0, or the epoch after the checkpoint it resumed from
    node_id: str
    hostname: str
    pid: int


@dataclass(frozen=True)
class Baseline:
    kind: ClassVar[Event] = Event.BASELINE
    every_rank: ClassVar[bool] = False
    metrics: dict[str, float]  # baseline_test/<metric>


@dataclass(frozen=True)
class EpochEnded:
    kind: ClassVar[Event] = Event.EPOCH_ENDED
    every_rank: ClassVar[bool] = False
    metrics: dict  # epoch, train/*, train_eval/*, val/*, batchnorm/*, best_epoch, early_stopped: one line of metrics.jsonl

    @property
    def epoch(self) -> int:
        return self.metrics["epoch"]


@dataclass(frozen=True)
class Diverged:
    kind: ClassVar[Event] = Event.DIVERGED
    every_rank: ClassVar[bool] = False
    epoch: int
    step: int  # 0-based optimizer step counted from the run's start


@dataclass(frozen=True)
class FinalTest:
    kind: ClassVar[Event] = Event.FINAL_TEST
    every_rank: ClassVar[bool] = False
    metrics: dict[str, float]  # test/*, constant_test/*, baseline_test/*, and the checkpoint metric's best value
    rows: dict = field(default_factory=dict)  # the task's per-row results on test (Task.eval_rows), as arrays
    # the worst mistakes on test, worst first: the row in words (Task.row_in_words) and the input
    # the model saw ({"text"} or {"image": a data URL})
    mistakes: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerPhases:
    kind: ClassVar[Event] = Event.WORKER_PHASES
    every_rank: ClassVar[bool] = False
    started_at: float  # wall clock (time.time()) when the worker loop began
    ended_at: float  # and when it sent this
    seconds: dict[str, float]  # model_setup, baseline, data_start, training, evaluation, checkpoints, test


@dataclass(frozen=True)
class WorkProgress:
    """Rank 0, while it works between optimizer steps (the step bar stands still then): what it is
    doing and how far it got; about once a second."""

    what: str  # "baseline on test", "validating", "train-eval", "recalibrating BatchNorm", "testing"
    done: int  # rows so far (0: just started)


@dataclass(frozen=True)
class StepProgress:
    epoch: int
    step: int  # optimizer steps done in this epoch
    steps: int  # optimizer steps per epoch
    loss: float  # mean training loss of the epoch so far
    samples_per_s: float  # all workers together
    recent_loss: float  # mean training loss of the steps since the progress before
    lrs: dict[str, float]  # each layer group's learning rate now (frozen groups absent)

    @property
    def global_step(self) -> int:
        """Optimizer steps since the run began."""
        return self.epoch * self.steps + self.step


RunEvent = LayerGroups | BatchNormPlan | WorkerStarted | Baseline | EpochEnded | Diverged | FinalTest | WorkerPhases


class Subscriber(Protocol):
    """What the driver hands each event and step progress to, in the order rank 0 sent them (an
    epoch a restarted worker group resent: only if the run's record lacks it, driver.hand_out)."""

    def on_event(self, event: RunEvent) -> None: ...

    def on_step(self, progress: StepProgress) -> None: ...

    def on_work(self, progress: WorkProgress) -> None: ...


class EventSink:
    """A worker's side: sends its events to the run's monitor actor (that of `finetune train`'s
    driver, or of a sweep trial's Tune actor; none: nobody listens). Events for one rank are sent
    by rank 0 only."""

    def __init__(self, monitor, rank: int) -> None:
        self.monitor, self.rank = monitor, rank

    def emit(self, event: RunEvent) -> None:
        """Returns once the monitor holds `event` (a few per epoch): a report that follows it reaches
        the driver after it (`training.monitor.EventsHandled`)."""
        if self.monitor is not None and (event.every_rank or self.rank == 0):
            import ray

            ray.get(self.monitor.record.remote(event))

    def step(self, progress: StepProgress | WorkProgress) -> None:
        """Fire and forget (many per epoch): the driver shows the latest."""
        if self.monitor is not None and self.rank == 0:
            self.monitor.progress.remote(progress)
