"""Strategies that train a fixed subset of the parameters: linear_probe, partial, bitfit."""

from __future__ import annotations

import re

from torch import nn

from finetune.config import BitFitConfig, LinearProbeConfig, PartialConfig
from finetune.models.groups import LayerGroup
from finetune.strategies.base import NoHooks, param_groups, set_trainable


class _Subset(NoHooks):
    freezes = True

    def __init__(self, cfg):
        self.cfg = cfg

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        raise NotImplementedError

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        names = self.trainable(groups)
        set_trainable(model, names)
        return param_groups(groups, lr, only=names)


class LinearProbeStrategy(_Subset):
    cfg: LinearProbeConfig

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        return set(groups[-1].params)


class PartialStrategy(_Subset):
    cfg: PartialConfig

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        names = {name for group in groups for name in group.params}
        if self.cfg.freeze_groups is not None:
            if self.cfg.freeze_groups >= len(groups):
                raise ValueError(
                    f"strategy.freeze_groups={self.cfg.freeze_groups}: this model has {len(groups)} layer groups "
                    f"({', '.join(g.name for g in groups)}); the head must stay trainable"
                )
            frozen = {name for group in groups[: self.cfg.freeze_groups] for name in group.params}
        else:
            pattern = re.compile(self.cfg.freeze_regex)
            frozen = {name for name in names if pattern.search(name)}
            if not frozen:
                raise ValueError(f"strategy.freeze_regex={self.cfg.freeze_regex!r} matches no parameter")
        return names - frozen


class BitFitStrategy(_Subset):
    cfg: BitFitConfig

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        biases = {name for group in groups for name in group.params if name.endswith("bias")}
        return biases | set(groups[-1].params)
