"""full: every parameter trains at the configured learning rate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from finetune.config.base import Section
from finetune.strategies.registry import register_strategy
from finetune.strategies.base import NoHooks, param_groups

if TYPE_CHECKING:
    from torch import nn
    from finetune.models.groups import LayerGroup


class FullStrategyConfig(Section):
    name: Literal["full"] = Field("full", description="full: every parameter trains.")


@register_strategy(FullStrategyConfig)
class FullStrategy(NoHooks):
    def __init__(self, cfg: FullStrategyConfig):
        self.cfg = cfg

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        return param_groups(groups, lr)
