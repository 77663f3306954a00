"""full: every parameter trains at the configured learning rate."""

from __future__ import annotations

import torch
from torch import nn

from finetune.config import FullStrategyConfig


class FullStrategy:
    freezes = False

    def __init__(self, cfg: FullStrategyConfig):
        self.cfg = cfg

    def setup(self, model: nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None
