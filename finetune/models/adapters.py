"""Adapters (LoRA via peft) folded back into plain weights, so an exported model needs no peft."""

from __future__ import annotations

import copy

from torch import nn


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA adapter merged into its base layer and removed."""
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return model
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            merged.set_submodule(name, module.get_base_layer())
    return merged
