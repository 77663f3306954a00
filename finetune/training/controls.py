"""Training controls from the pipeline's `train` section: early stopping and an exponential
moving average of the weights. Plain PyTorch (no Ray); both save and restore their state
with the checkpoint, so a resumed run continues them."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from finetune.config import EarlyStoppingConfig, EmaConfig, metric_mode


def improved(score: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return score > best + min_delta if mode == "max" else score < best - min_delta


class EarlyStopping:
    """Stop once the metric has not improved (by more than min_delta) for `patience` epochs."""

    def __init__(self, cfg: EarlyStoppingConfig, metric: str) -> None:
        self.cfg, self.metric = cfg, metric
        self.mode = metric_mode(metric)
        self.best: float | None = None
        self.epochs_without_improvement = 0

    def should_stop(self, metrics: dict[str, float]) -> bool:
        score = metrics[self.metric]
        if improved(score, self.best, self.mode, self.cfg.min_delta):
            self.best, self.epochs_without_improvement = score, 0
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epochs_without_improvement = state["best"], state["epochs_without_improvement"]


def ema_model(module: nn.Module, cfg: EmaConfig | None) -> AveragedModel | None:
    """torch's AveragedModel with the EMA update, buffers (BatchNorm statistics) averaged too:
    after each optimizer step, ema = decay * ema + (1 - decay) * weights."""
    if cfg is None:
        return None
    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(cfg.decay), use_buffers=True)
