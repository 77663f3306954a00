"""Fine-tuning strategies: small objects with optional hooks the training loop calls.

Hooks (all optional; see `Strategy`):
  setup(model) -> list of optimizer param groups   what trains, at which learning rate
  on_epoch_start(epoch, model, optimizer)          e.g. gradual unfreezing
  penalty(model) -> Tensor                         e.g. L2-SP toward the pretrained weights
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from finetune.strategies.full import FullStrategy


class Strategy(Protocol):
    # True when some parameters get no gradient in a step, so DDP must not wait for them.
    freezes: bool

    def setup(self, model: nn.Module) -> list[dict]: ...

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def penalty(self, model: nn.Module) -> torch.Tensor | None: ...


REGISTRY: dict[str, type] = {"full": FullStrategy}


def build_strategy(cfg) -> Strategy:
    """The strategy named by `cfg.name`, built from its config section."""
    try:
        return REGISTRY[cfg.name](cfg)
    except KeyError:
        raise ValueError(f"strategy.name={cfg.name!r}: known strategies are {', '.join(REGISTRY)}") from None
