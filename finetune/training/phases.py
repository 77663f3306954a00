"""Where a run's wall time goes, phase by phase: the driver's clock and the worker group's
(`WorkerPhases`, sent by rank 0 at its end), joined into summary.json's "phases_s"."""

from __future__ import annotations

import contextlib
import time

from finetune.training.events import WorkerPhases

# In the order a run meets them; they add up to wall_s.
PHASES = {
    "ray_start": "starting or joining Ray",
    "read_data": "reading the data's labels and row counts on the driver",
    "yardstick": "fitting and scoring the yardstick (yardstick.enabled) on the driver",
    "tracking": "opening the experiment trackers' runs (closing them comes after the summary is written)",
    "worker_group_start": "from fit() to the worker loop's first line (after a restart: its last start)",
    "model_setup": "building or loading the model, strategy, optimizer, DDP; loading a checkpoint",
    "baseline": "the pretrained model with its new head, on test",
    "data_start": "waiting for each epoch's first training batch",
    "training": "training steps",
    "evaluation": "train-eval and validation passes, BatchNorm recalibration",
    "checkpoints": "writing and reporting each epoch's checkpoint",
    "test": "the best epoch on test",
    "shutdown": "from the worker loop's end to fit() returning",
    "export": "copying the best checkpoint to best/",
    "other": "the rest: the driver's bookkeeping, a failed worker group's time",
}


class PhaseClock:
    """Seconds per phase, added up over the times each phase runs."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - started)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def worker_phases(self) -> WorkerPhases:
        return WorkerPhases(self.started_at, time.time(), dict(self.seconds))


def run_phases(driver: PhaseClock, fit_started: float, fit_ended: float, worker: WorkerPhases | None,
               wall_s: float) -> dict[str, float]:  # fmt: skip
    """The run's wall time by phase (PHASES order); without the worker's (a run that diverged),
    the time in fit() is one phase."""
    seconds = dict(driver.seconds)
    if worker is None:
        seconds["training"] = fit_ended - fit_started
    else:
        seconds["worker_group_start"] = worker.started_at - fit_started
        seconds.update(worker.seconds)
        seconds["shutdown"] = fit_ended - worker.ended_at
    seconds["other"] = wall_s - sum(seconds.values())
    return {phase: round(max(seconds[phase], 0.0), 2) for phase in PHASES if phase in seconds}
