"""gradual_unfreeze (ULMFiT): the head first, then one more group from the top every N epochs or steps.

Every group is in the optimizer from the start; a frozen group has no gradient, so the
optimizer leaves it (and its momentum) alone until it is unfrozen. The unfrozen set is a
function of the epoch (or global step) alone, so a run resumed from a checkpoint picks the
schedule up where it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from finetune.config.base import Section
from finetune.strategies.registry import register_strategy
from finetune.strategies.base import NoHooks, group_lr_scales, one_period, param_groups, set_trainable

if TYPE_CHECKING:
    from torch import nn
    from finetune.models.groups import LayerGroup


class GradualUnfreezeConfig(Section):
    name: Literal["gradual_unfreeze"] = Field(
        description="gradual_unfreeze (ULMFiT): start with the head, unfreeze one more group from the top "
        "every `every_epochs` epochs or every `every_steps` optimizer steps."
    )
    every_epochs: int | None = Field(
        None, ge=1, description="Epochs between two unfreezings (the default, 1, when every_steps is not set)."
    )
    every_steps: int | None = Field(
        None, ge=1, description="Optimizer steps between two unfreezings, for short runs where epochs are too coarse."
    )
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="Also use discriminative rates: lr * layer_decay^(groups from the head)."
    )

    @model_validator(mode="after")
    def _one_period(self) -> "GradualUnfreezeConfig":
        return one_period(self, "every_epochs", "every_steps")


def unfrozen_count(epoch: int, step: int, cfg: GradualUnfreezeConfig, total_groups: int) -> int:
    """Groups trainable (counted from the head) at global optimizer `step` of `epoch`."""
    periods = step // cfg.every_steps if cfg.every_steps else epoch // cfg.every_epochs
    return min(total_groups, 1 + periods)


@register_strategy(GradualUnfreezeConfig)
class GradualUnfreezeStrategy(NoHooks):
    freezes = True

    def __init__(self, cfg: GradualUnfreezeConfig):
        self.cfg = cfg
        self.groups: list[LayerGroup] = []
        self.count = 0

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        self.groups, self.count = groups, 1
        set_trainable(model, set(groups[-1].params))
        return param_groups(groups, lr, group_lr_scales(groups, self.cfg.layer_decay))

    def before_step(self, epoch: int, step: int, model: nn.Module) -> None:
        count = unfrozen_count(epoch, step, self.cfg, len(self.groups))
        if count != self.count:
            self.count = count
            set_trainable(model, {name for group in self.groups[-count:] for name in group.params})
