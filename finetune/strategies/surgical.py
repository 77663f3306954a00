"""surgical (Lee et al., ICLR 2023): train only some layer groups, plus the new head. Which
block to tune depends on how the user's data differs from the pretraining data: input-level
shifts (image corruptions) favour the first blocks, output-level shifts (new labels on the
same inputs) the last ones; tuning one block can beat tuning all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from finetune.config.base import Section
from finetune.strategies.registry import register_strategy
from finetune.strategies.subsets import Subset

if TYPE_CHECKING:
    from finetune.models.groups import LayerGroup


class SurgicalConfig(Section):
    name: Literal["surgical"] = Field(
        description="surgical: only the named layer groups (or the first/last K) train, plus the head."
    )
    groups: list[str] | None = Field(
        None, description="Layer groups to train, by name as a run's layer-group table prints them (e.g. stem, "
        "bert.encoder.layer.0); `finetune validate` refuses a name the model lacks and lists its groups.",
    )
    first: int | None = Field(None, ge=1, description="Train the first K groups from the input side (stem first).")
    last: int | None = Field(None, ge=1, description="Train the last K groups before the head.")

    @model_validator(mode="after")
    def _one_rule(self) -> "SurgicalConfig":
        if sum(rule is not None for rule in (self.groups, self.first, self.last)) != 1:
            raise ValueError("strategy.groups, strategy.first and strategy.last: set exactly one of them")
        if self.groups is not None and not self.groups:
            raise ValueError("strategy.groups is empty: name at least one layer group, or use linear_probe")
        return self


@register_strategy(SurgicalConfig)
class SurgicalStrategy(Subset):
    cfg: SurgicalConfig

    def trainable(self, groups: list[LayerGroup]) -> set[str]:
        body = groups[:-1]
        names = [group.name for group in body]
        if self.cfg.groups is not None:
            unknown = [name for name in self.cfg.groups if name not in names]
            if unknown:
                raise ValueError(f"strategy.groups: {', '.join(map(repr, unknown))} is not a layer group of this "
                                 f"model; its groups below the head are {', '.join(names)}")  # fmt: skip
            chosen = [group for group in body if group.name in self.cfg.groups]
        else:
            count = self.cfg.first or self.cfg.last
            if count > len(body):
                raise ValueError(f"strategy.{'first' if self.cfg.first else 'last'}={count}: this model has "
                                 f"{len(body)} layer groups below the head ({', '.join(names)})")  # fmt: skip
            chosen = body[:count] if self.cfg.first else body[-count:]
        return {name for group in [*chosen, groups[-1]] for name in group.params}
