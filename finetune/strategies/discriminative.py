"""discriminative: per-group learning rates, lr * layer_decay^(distance from the head) (ULMFiT, LLRD)."""

from __future__ import annotations

from torch import nn

from finetune.config import DiscriminativeConfig
from finetune.models.groups import LayerGroup
from finetune.strategies.base import NoHooks, group_lr_scales, param_groups


class DiscriminativeStrategy(NoHooks):
    def __init__(self, cfg: DiscriminativeConfig):
        self.cfg = cfg

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        return param_groups(groups, lr, group_lr_scales(groups, self.cfg.layer_decay))
