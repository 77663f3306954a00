"""lp_ft (Kumar et al., ICLR 2022): train the new head alone first (a linear probe), then every
parameter at a lower rate. A head that already fits the features sends small gradients into
the body, so fine-tuning distorts the pretrained features less than when a random head starts
it (their ~1% better in distribution, ~10% out of distribution).

Both phases run in one schedule: during the probe the head's rate is `optim.lr *
probe_lr_scale` (a probe wants a rate well above fine-tuning's), afterwards every group trains
at `optim.lr`. The phase is a function of the epoch or global step alone, so a resumed run
picks it up where it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from finetune.config.base import Section
from finetune.strategies.base import NoHooks, one_period, param_groups, set_trainable
from finetune.strategies.registry import register_strategy

if TYPE_CHECKING:
    from torch import nn
    from finetune.models.groups import LayerGroup


class LpFtConfig(Section):
    name: Literal["lp_ft"] = Field(
        description="lp_ft (LP-FT): the head alone for `probe_epochs` epochs or `probe_steps` steps at "
        "lr * probe_lr_scale, then every parameter at lr."
    )
    probe_epochs: int | None = Field(
        None, ge=1, description="Epochs of the head alone (the default, 1, when probe_steps is not set)."
    )
    probe_steps: int | None = Field(
        None, ge=1, description="Optimizer steps of the head alone, for short runs where epochs are too coarse."
    )
    probe_lr_scale: float = Field(
        10.0, gt=0.0, description="The head's rate during the probe, as a multiple of optim.lr (the fine-tuning "
        "rate). Measured here: a probe's best rate is 10x (images) to 100x (text) full fine-tuning's.",
    )

    @model_validator(mode="after")
    def _one_period(self) -> "LpFtConfig":
        return one_period(self, "probe_epochs", "probe_steps")


@register_strategy(LpFtConfig)
class LpFtStrategy(NoHooks):
    freezes = True
    scales_lr = True

    def __init__(self, cfg: LpFtConfig):
        self.cfg = cfg
        self.groups: list[LayerGroup] = []
        self.probing = True

    def in_probe(self, epoch: int, step: int) -> bool:
        return step < self.cfg.probe_steps if self.cfg.probe_steps else epoch < self.cfg.probe_epochs

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        self.groups, self.probing = groups, True
        set_trainable(model, set(groups[-1].params))
        return param_groups(groups, lr)  # every group in the optimizer: frozen ones have no gradient yet

    def before_step(self, epoch: int, step: int, model: nn.Module) -> None:
        probing = self.in_probe(epoch, step)
        if probing != self.probing:
            self.probing = probing
            set_trainable(model, {name for group in (self.groups[-1:] if probing else self.groups)
                                  for name in group.params})  # fmt: skip

    def lr_scales(self, epoch: int, step: int) -> dict[str, float]:
        return {self.groups[-1].name: self.cfg.probe_lr_scale} if self.in_probe(epoch, step) else {}
