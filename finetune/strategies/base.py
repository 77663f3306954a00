"""Plain functions the strategies share; usable without a trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from finetune.models.groups import LayerGroup


def one_period(section, epochs: str, steps: str):
    """A schedule keyed by epochs or by optimizer steps: at most one of the two set; neither
    means one epoch. For a strategy section's `model_validator(mode="after")`."""
    if getattr(section, epochs) is not None and getattr(section, steps) is not None:
        raise ValueError(f"strategy.{epochs} and strategy.{steps}: set at most one of them")
    if getattr(section, epochs) is None and getattr(section, steps) is None:
        setattr(section, epochs, 1)
    return section


def set_trainable(model: nn.Module, trainable: set[str]) -> None:
    """requires_grad on exactly the named parameters; every other parameter is frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def group_lr_scales(groups: list[LayerGroup], layer_decay: float | None) -> list[float]:
    """lr multiplier per group: layer_decay ** (groups between it and the head); 1 without decay."""
    last = len(groups) - 1
    return [1.0 if layer_decay is None else layer_decay ** (last - i) for i in range(len(groups))]


def param_groups(
    groups: list[LayerGroup], lr: float, scales: list[float] | None = None, only: set[str] | None = None
) -> list[dict]:
    """One optimizer group per layer group (named, with its lr times its scale, 1 by default),
    keeping only `only` names if given."""
    out = []
    for group, scale in zip(groups, scales or [1.0] * len(groups)):
        params = [p for name, p in group.params.items() if only is None or name in only]
        if params:
            out.append({"params": params, "lr": lr * scale, "name": group.name})
    return out


class NoHooks:
    """Defaults for the optional hooks."""

    freezes = False
    scales_lr = False  # True: `lr_scales` changes rates by phase, and the run's schedule applies it

    def adapt(self, model: nn.Module) -> None:
        """Change the model's structure before its layer groups are read (e.g. add adapters)."""

    def before_step(self, epoch: int, step: int, model: nn.Module) -> None:
        """Called before each optimizer step (its first micro-batch); `step` counts from the run's start."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def lr_scales(self, epoch: int, step: int) -> dict[str, float]:
        """Multipliers on the schedule's rate by layer-group name (a name left out: 1) at global
        optimizer `step` of `epoch`; read only when `scales_lr`."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must keep for the strategy to continue where it was (none: its
        schedule is a function of the epoch and step)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, after `setup`."""
