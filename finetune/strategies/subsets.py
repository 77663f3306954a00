"""Strategies that train a fixed subset of the parameters: linear_probe, partial, bitfit."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from finetune.config.base import Section, regex_problem
from finetune.strategies.registry import register_strategy
from finetune.strategies.base import NoHooks, param_groups, set_trainable

if TYPE_CHECKING:
    from torch import nn
    from finetune.models.groups import LayerGroup


class LinearProbeConfig(Section):
    name: Literal["linear_probe"] = Field(description="linear_probe: only the new head trains.")


class PartialConfig(Section):
    name: Literal["partial"] = Field(description="partial: freeze the first groups, or parameters by regex.")
    freeze_groups: int | None = Field(
        None, ge=1, description="Freeze this many layer groups from the input side (stem first)."
    )
    freeze_regex: str | None = Field(None, description="Freeze every parameter whose name matches this regex.")

    @model_validator(mode="after")
    def _one_rule(self) -> "PartialConfig":
        if (self.freeze_groups is None) == (self.freeze_regex is None):
            raise ValueError("strategy.freeze_groups and strategy.freeze_regex: set exactly one of them")
        if self.freeze_regex is not None and (problem := regex_problem(self.freeze_regex)):
            raise ValueError(f"strategy.freeze_regex={self.freeze_regex!r} is not a regex: {problem}")
        return self


class BitFitConfig(Section):
    name: Literal["bitfit"] = Field(description="bitfit: only biases (and the new head) train.")


class Subset(NoHooks):
    """A fixed set of parameters trains, named by `trainable(groups)`; the rest stay frozen."""

    freezes = True

    def __init__(self, cfg):
        self.cfg = cfg

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        raise NotImplementedError

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        names = self.trainable(groups)
        set_trainable(model, names)
        return param_groups(groups, lr, only=names)


@register_strategy(LinearProbeConfig)
class LinearProbeStrategy(Subset):
    cfg: LinearProbeConfig

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        return set(groups[-1].params)


@register_strategy(PartialConfig)
class PartialStrategy(Subset):
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


@register_strategy(BitFitConfig)
class BitFitStrategy(Subset):
    cfg: BitFitConfig

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        biases = {name for group in groups for name in group.params if name.endswith("bias")}
        return biases | set(groups[-1].params)
