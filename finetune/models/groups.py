"""`layer_groups(model)`: a classifier's parameters as named groups, ordered input -> output.

Strategies see models only through these groups (stem/embeddings, blocks..., neck, head), so
one strategy serves BERT, ResNet, MobileNet, EfficientNet, ViT and EfficientNet-Lite alike.
The blocks are found structurally: ResNet-style `layer1..layerN` stages, else the largest
ModuleList/Sequential of blocks (BERT's encoder.layer, torchvision's `features` or
`encoder.layers`, EfficientNet-Lite's `_blocks`). A model whose blocks are not found that way
declares its groups in the pipeline: `model.layer_groups`, one regex per group, input -> output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.models.text import TextClassifier
from finetune.models.vision import ImageClassifier, classifier_head_name


@dataclass
class LayerGroup:
    name: str
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # qualified name -> parameter

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params.values())


class UnknownArchitecture(ValueError):
    """The model's blocks could not be found; its layer groups must be declared."""


def _declare_hint(model: nn.Module) -> str:
    prefixes = list(dict.fromkeys(name.rsplit(".", 1)[0] + "." for name, _ in model.named_parameters()))
    shown = ", ".join(prefixes[:6]) + (", ..." if len(prefixes) > 6 else "")
    return (
        "declare the groups in the pipeline, input -> output, one regex per group (the new head is "
        "found on its own), e.g. model.layer_groups: ['^net\\.stem\\.', '^net\\.blocks\\.[0-3]\\.', "
        f"'^net\\.blocks\\.'] (a parameter joins the first group that matches it); its parameter names start {shown}"
    )


def head_prefix(model: nn.Module) -> re.Pattern:
    """Matches the qualified names (`name.`) of the new classification head's parameters and modules."""
    return re.compile(_head_prefix(model))


def _head_prefix(model: nn.Module) -> str:
    if isinstance(model, TextClassifier):
        base = model.hf_model.base_model_prefix
        # Everything outside the pretrained base model is the task head (classifier, pre_classifier).
        names = [n for n, _ in model.hf_model.named_children() if n != base]
        return "|".join(re.escape(f"hf_model.{n}.") for n in names)
    if isinstance(model, ImageClassifier):
        return re.escape(f"net.{classifier_head_name(model.net)}.")
    raise UnknownArchitecture(f"{type(model).__name__} is not a classifier built by finetune.models")


def _block_prefixes(model: nn.Module) -> list[str]:
    """Qualified name prefixes of the blocks, in order."""
    stages = [n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?layer\d+", n)]
    if len(stages) >= 2:
        return [f"{n}." for n in stages]
    containers = [
        (sum(p.numel() for p in module.parameters()), name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2
    ]
    if not containers:
        raise UnknownArchitecture(f"{type(model).__name__}: no sequence of blocks found; " + _declare_hint(model))
    _, name, module = max(containers, key=lambda item: item[0])
    return [f"{name}.{child}." for child, sub in module.named_children() if any(True for _ in sub.parameters())]


def _declared_groups(model: nn.Module, head: re.Pattern, patterns: list[str]) -> dict[str, LayerGroup]:
    groups = {pattern: LayerGroup(pattern) for pattern in patterns}
    unmatched = []
    for name, param in model.named_parameters():
        if head.match(name):
            continue
        pattern = next((p for p in patterns if re.search(p, name)), None)
        if pattern is None:
            unmatched.append(name)
        else:
            groups[pattern].params[name] = param
    if unmatched:
        raise UnknownArchitecture(
            f"model.layer_groups: {len(unmatched)} parameters match no group, e.g. {', '.join(unmatched[:3])}; "
            "add a pattern for them (every parameter outside the head belongs to one group)"
        )
    empty = [p for p, group in groups.items() if not group.params]
    if empty:
        raise UnknownArchitecture(f"model.layer_groups: {empty} match no parameter (or only ones an earlier group took)")
    return groups


def layer_groups(model: nn.Module, declared: list[str] | None = None) -> list[LayerGroup]:
    """Groups in input -> output order: stem, each block, neck (if any), head; or the `declared`
    regexes (model.layer_groups) followed by the head."""
    head = head_prefix(model)
    if declared:
        groups = _declared_groups(model, head, declared)
    else:
        groups = _structural_groups(model, head)
    groups["head"] = LayerGroup("head", {n: p for n, p in model.named_parameters() if head.match(n)})
    if not groups["head"].params:
        raise UnknownArchitecture(f"{type(model).__name__}: no classification head found")
    return [group for group in groups.values() if group.params]


def _structural_groups(model: nn.Module, head: re.Pattern) -> dict[str, LayerGroup]:
    blocks = _block_prefixes(model)
    groups = {"stem": LayerGroup("stem")}
    # Display names without the wrapper's attribute: "layer1", "features.3", "bert.encoder.layer.0".
    groups.update({prefix.rstrip("."): LayerGroup(prefix.rstrip(".").split(".", 1)[1]) for prefix in blocks})
    groups["neck"] = LayerGroup("neck")
    seen_block = False
    for name, param in model.named_parameters():
        if head.match(name):
            continue
        block = next((prefix for prefix in blocks if name.startswith(prefix)), None)
        if block:
            seen_block = True
            groups[block.rstrip(".")].params[name] = param
        else:
            groups["neck" if seen_block else "stem"].params[name] = param
    return groups


def output_layer(model: nn.Module) -> nn.Linear:
    """The head's last linear layer, the one whose outputs are the model's."""
    head = head_prefix(model)
    linears = [m for name, m in model.named_modules() if head.match(f"{name}.") and isinstance(m, nn.Linear)]
    if not linears:
        raise UnknownArchitecture(f"{type(model).__name__}: its head has no linear layer")
    return linears[-1]


def init_head(model: nn.Module, scheme: str) -> None:
    """Re-initialise the new head's weights by `scheme`; biases to zero. `default` keeps the library's."""
    if scheme == "default":
        return
    head = head_prefix(model)
    for name, param in model.named_parameters():
        if not head.match(name):
            continue
        with torch.no_grad():
            if param.dim() < 2:
                nn.init.zeros_(param)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(param)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(param, nonlinearity="linear")
            elif scheme == "normal":
                nn.init.normal_(param, std=0.02)
            else:
                nn.init.zeros_(param)
