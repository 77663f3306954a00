"""Fine-tuning strategies: small objects with optional hooks the training loop calls.

Hooks (see `Strategy`):
  adapt(model)                                        structural changes first, e.g. LoRA adapters
  setup(model, groups, lr) -> optimizer param groups   what trains, at which learning rate
  before_step(epoch, step, model)                     e.g. gradual unfreezing (step: global optimizer step)
  penalty(model) -> Tensor | None                     e.g. L2-SP toward the pretrained weights
  lr_scales(epoch, step) -> {group: multiplier}       rates that change by phase, e.g. LP-FT's probe
  state_dict() / load_state_dict(state)               what a checkpoint keeps of it (default: nothing)

A strategy is one module: its config section and its class, registered together with
`@register_strategy(Config)` (strategies/registry.py); the pipeline schema builds its `strategy`
section from the registry. Strategies see a model only through `layer_groups(model)` (stem, blocks..., neck, head).
A strategy that freezes says so (`freezes = True`): DDP then tolerates parameters without
gradients. Parameters it freezes for good stay out of the optimizer; parameters it will
unfreeze later sit in the optimizer with no gradient, which every torch optimizer skips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

# importing each strategy's module registers it (and its config section), in this order
from finetune.strategies import full  # noqa: F401, I001
from finetune.strategies import subsets  # noqa: F401 - linear_probe, partial, bitfit
from finetune.strategies import discriminative, gradual, l2sp, lora, lp_ft, surgical  # noqa: F401
from finetune.strategies.registry import STRATEGIES

if TYPE_CHECKING:
    import torch
    from torch import nn

    from finetune.models.groups import LayerGroup


class Strategy(Protocol):
    freezes: bool
    scales_lr: bool

    def adapt(self, model: nn.Module) -> None: ...

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]: ...

    def before_step(self, epoch: int, step: int, model: nn.Module) -> None: ...

    def penalty(self, model: nn.Module) -> torch.Tensor | None: ...

    def lr_scales(self, epoch: int, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_strategy(cfg) -> Strategy:
    """The strategy named by `cfg.name`, built from its config section."""
    try:
        return STRATEGIES[cfg.name](cfg)
    except KeyError:
        raise ValueError(f"strategy.name={cfg.name!r}: known strategies are {', '.join(STRATEGIES)}") from None
