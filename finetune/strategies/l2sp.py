"""l2sp (Li et al. 2018): alpha/2 ||w - w0||^2 toward the pretrained backbone, beta/2 ||w||^2 on the
new head, in place of weight decay (which would pull the backbone toward zero instead)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from finetune.config.base import Section
from finetune.strategies.registry import register_strategy
from finetune.strategies.base import NoHooks, param_groups

if TYPE_CHECKING:
    from torch import nn
    import torch
    from finetune.models.groups import LayerGroup


class L2SPConfig(Section):
    name: Literal["l2sp"] = Field(
        description="l2sp: alpha/2 ||w - w_pretrained||^2 on the backbone + beta/2 ||w||^2 on the head, "
        "in place of weight decay (Li et al. 2018)."
    )
    alpha: float = Field(0.01, ge=0.0, description="Pull of the backbone toward its pretrained weights.")
    beta: float = Field(0.01, ge=0.0, description="Plain L2 on the new head.")


@register_strategy(L2SPConfig)
class L2SPStrategy(NoHooks):
    def __init__(self, cfg: L2SPConfig):
        self.cfg = cfg
        self.anchors: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.head: list[nn.Parameter] = []

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        # setup runs on the freshly built model, before any checkpoint is loaded: w0 is pretrained.
        self.anchors = [(p, p.detach().clone()) for group in groups[:-1] for p in group.params.values()]
        self.head = list(groups[-1].params.values())
        out = param_groups(groups, lr)
        for group in out:
            group["weight_decay"] = 0.0
        return out

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if self.anchors and self.anchors[0][1].device != self.anchors[0][0].device:
            self.anchors = [(p, w0.to(p.device)) for p, w0 in self.anchors]  # once, after the model moved
        backbone = sum(((p - w0) ** 2).sum() for p, w0 in self.anchors)
        head = sum((p**2).sum() for p in self.head)
        return self.cfg.alpha / 2 * backbone + self.cfg.beta / 2 * head
