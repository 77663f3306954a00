"""full: every parameter trains at the configured learning rate."""

from __future__ import annotations

from torch import nn

from finetune.config import FullStrategyConfig
from finetune.models.groups import LayerGroup
from finetune.strategies.base import NoHooks, param_groups


class FullStrategy(NoHooks):
    def __init__(self, cfg: FullStrategyConfig):
        self.cfg = cfg

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        return param_groups(groups, lr)
