"""lora: low-rank adapters (Hu et al. 2021) through peft; only adapters and the new head train.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model keeps its own
forward and layer groups; `finetune.models.adapters.merge_adapters` folds them into plain
weights when the model is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from finetune.config.base import Section
from finetune.strategies.registry import register_strategy
from finetune.strategies.base import NoHooks, param_groups, set_trainable

if TYPE_CHECKING:
    from torch import nn
    from finetune.models.groups import LayerGroup


class LoRAConfig(Section):
    name: Literal["lora"] = Field(
        description="lora: low-rank adapters (peft) on the backbone's linear and convolution layers; the "
        "new head trains fully; adapters are merged into the weights on export."
    )
    r: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0.0, description="Adapter scaling: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names (or name suffixes, e.g. [query, value]) to adapt; unset = every Linear "
        "and (non-depthwise) Conv2d layer outside the head.",
    )


def default_targets(model: nn.Module) -> list[str]:
    """Every Linear and non-depthwise Conv2d outside the head, by full module name.

    Exact types only: peft builds a conv adapter as another instance of the base layer's class,
    which fails for subclasses with extra constructor arguments (EfficientNet-Lite's
    static-padding convolutions: `adapt` first turns its 1x1 ones into plain Conv2d; the 3x3
    stem conv stays unadapted).
    """
    from torch import nn

    from finetune.models.groups import head_prefix

    head = head_prefix(model)
    return [
        name
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1))
        and not head.match(f"{name}.")
    ]


@register_strategy(LoRAConfig)
class LoRAStrategy(NoHooks):
    freezes = True

    def __init__(self, cfg: LoRAConfig):
        self.cfg = cfg

    def adapt(self, model: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        from finetune.models.vision import plain_pointwise_convs

        plain_pointwise_convs(model)  # EfficientNet-Lite: its 1x1 convs become adaptable
        targets = self.cfg.target_modules or default_targets(model)
        if not targets:
            raise ValueError(
                f"strategy.name=lora: {type(getattr(model, 'net', model)).__name__} has no plain Linear or Conv2d "
                "layer outside its head for peft to adapt; name layers in strategy.target_modules or pick another strategy"
            )
        config = LoraConfig(r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                            target_modules=targets)  # fmt: skip
        try:
            inject_adapter_in_model(config, model)
        except ValueError as error:
            raise ValueError(f"strategy.target_modules={targets}: {error}") from None

    def setup(self, model: nn.Module, groups: list[LayerGroup], lr: float) -> list[dict]:
        names = {n for n, _ in model.named_parameters() if "lora_" in n} | set(groups[-1].params)
        set_trainable(model, names)
        return param_groups(groups, lr, only=names)
