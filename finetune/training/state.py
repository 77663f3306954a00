"""What a checkpoint holds, defined once: `TrainState.save(dir)` writes it beside the saved
model, `TrainState.load(dir)` restores it into a freshly set-up worker. Plain PyTorch (no Ray).

The model's state_dict carries its BatchNorm buffers (recalibrated before the epoch's
validation); the live objects (optimizer, scheduler, ...) are restored in place, the counters
and the best epoch's weights are replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TRAIN_STATE_FILE = "train_state.pt"


def cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


@dataclass
class BestEpoch:
    """The epoch whose checkpoint metric is best so far, and its evaluated weights."""

    metric: float | None = None
    epoch: int | None = None
    weights: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, score: float, mode: str, evaluated: nn.Module) -> None:
        # Ties go to the later epoch, as in Ray Train's checkpoint ranking, so the weights tested
        # at the end are the checkpoint Ray keeps as best.
        if self.metric is None or (score >= self.metric if mode == "max" else score <= self.metric):
            self.metric, self.epoch, self.weights = score, epoch, cpu_copy(evaluated)


@dataclass
class TrainState:
    model: nn.Module  # the model itself (not its DDP wrapper)
    evaluated: nn.Module  # what is validated, tested and exported: `model`, or its EMA (train.ema)
    optimizer: torch.optim.Optimizer
    scheduler: object  # a torch LR scheduler or optim.WarmupThenPlateau: state_dict/load_state_dict
    strategy: object  # its state_dict()/load_state_dict() (gradual unfreezing keeps none: the epoch decides)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    ema: nn.Module | None = None  # torch's AveragedModel
    early_stopping: object | None = None  # controls.EarlyStopping
    epoch: int = -1  # the last epoch finished
    best: BestEpoch = field(default_factory=BestEpoch)
    baseline: dict[str, float] = field(default_factory=dict)  # baseline_test/<metric>
    history: list[dict] = field(default_factory=list)  # every epoch's metrics, resent by a restarted worker group

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1

    def epochs_left(self, epochs: int) -> range:
        """The epochs still to train of `epochs`; none once early stopping has stopped the run."""
        stopper = self.early_stopping
        if stopper is not None and stopper.epochs_without_improvement >= stopper.cfg.patience:
            return range(0)
        return range(self.next_epoch, epochs)

    def save(self, directory: str | Path) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "strategy": self.strategy.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.state_dict() if self.ema else None,
                "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None,
                "epoch": self.epoch,
                # the best weights only when they differ from this epoch's (saves a copy)
                "best": {"metric": self.best.metric, "epoch": self.best.epoch,
                         "state": self.best.weights if self.best.epoch != self.epoch else None},  # fmt: skip
                "baseline": self.baseline,
                "history": self.history,
            },
            Path(directory) / TRAIN_STATE_FILE,
        )

    def load(self, directory: str | Path) -> None:
        # weights_only: a train_state.pt planted in shared storage cannot run code when a run resumes
        state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state.get("strategy") or {})
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        if self.early_stopping:
            self.early_stopping.load_state_dict(state["early_stopping"])
        self.epoch, self.baseline = state["epoch"], state["baseline"]
        self.history = state.get("history", [])  # checkpoints written before it was kept have none
        best = state["best"]
        # no weights saved: the checkpoint's own epoch was the best
        self.best = BestEpoch(best["metric"], best["epoch"], best["state"] or cpu_copy(self.evaluated))
