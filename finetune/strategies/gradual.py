"""gradual_unfreeze (ULMFiT): the head first, then one more group from the top every N epochs.

Every group is in the optimizer from the start; a frozen group has no gradient, so the
optimizer leaves it (and its momentum) alone until it is unfrozen. The unfrozen set is a
function of the epoch alone, so a run resumed from a checkpoint picks the schedule up where it was.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.config import GradualUnfreezeConfig
from finetune.models.groups import LayerGroup
from finetune.strategies.base import NoHooks, group_lr_scales, param_groups, set_trainable


def unfrozen_count(epoch: int, every_epochs: int, total_groups: int) -> int:
    return min(total_groups, 1 + epoch // every_epochs)


class GradualUnfreezeStrategy(NoHooks):
    freezes = True

    def __init__(self, cfg: GradualUnfreezeConfig):
        self.cfg = cfg
        self.groups: list[LayerGroup] = []

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        self.groups = groups
        set_trainable(model, set(groups[-1].params))
        return param_groups(groups, lr, group_lr_scales(groups, self.cfg.layer_decay))

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        count = unfrozen_count(epoch, self.cfg.every_epochs, len(self.groups))
        set_trainable(model, {name for group in self.groups[-count:] for name in group.params})
