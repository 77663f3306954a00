"""discriminative: per-group learning rates, lr * layer_decay^(distance from the head) (ULMFiT, LLRD)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from finetune.config.base import Section
from finetune.strategies.registry import register_strategy
from finetune.strategies.base import NoHooks, group_lr_scales, param_groups

if TYPE_CHECKING:
    from torch import nn
    from finetune.models.groups import LayerGroup


class DiscriminativeConfig(Section):
    name: Literal["discriminative"] = Field(
        description="discriminative: per-group learning rates, lr * layer_decay^(distance from the head)."
    )
    layer_decay: float = Field(0.8, gt=0.0, le=1.0, description="Rate multiplier per group away from the head.")


@register_strategy(DiscriminativeConfig)
class DiscriminativeStrategy(NoHooks):
    def __init__(self, cfg: DiscriminativeConfig):
        self.cfg = cfg

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        return param_groups(groups, lr, group_lr_scales(groups, self.cfg.layer_decay))
