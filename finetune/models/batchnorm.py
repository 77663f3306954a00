"""BatchNorm done right for fine-tuning. Plain PyTorch (no Ray): the worker loop, benchmarks and
tests call the same functions.

Two things go wrong with BatchNorm when a pretrained CNN meets a small new dataset:
  - a layer whose weights a strategy froze still updates its running statistics in train
    mode, so "frozen" is not frozen (the Keras guide: keep such layers in inference mode);
  - running statistics move slowly (EfficientNet-Lite carries TensorFlow's momentum, 0.01 in
    PyTorch's terms), so after a short fine-tune they still describe ImageNet while the weights
    describe the new data, and eval-mode accuracy falls far below what the weights can do.
The first is handled by `TrainModes` (frozen layers in eval mode while frozen); the second by
`recalibrate` (the statistics recomputed over training batches before the evaluations that
count, like torch.optim.swa_utils.update_bn and Precise BN).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer by module name (BatchNorm1d/2d/3d, SyncBatchNorm, torchvision's
    FrozenBatchNorm2d is not one: it has no running statistics to update)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _BatchNorm)}


def _owners(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters that decide whether each BatchNorm layer is frozen: its own affine weight
    and bias, or, for a layer without them, those of the module that holds it (its block)."""
    modules = dict(model.named_modules())
    owners = {}
    for name, layer in batchnorm_layers(model).items():
        params = list(layer.parameters())
        if not params:
            parent = modules.get(name.rpartition(".")[0], model)
            params = [p for child_name, p in parent.named_parameters()]
        owners[name] = params
    return owners


def _frozen(params: list[nn.Parameter]) -> bool:
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_layers(model: nn.Module) -> set[str]:
    """BatchNorm layers whose parameters the strategy has frozen now (none of them requires grad)."""
    return {name for name, params in _owners(model).items() if _frozen(params)}


class TrainModes:
    """`model.train()` with BatchNorm semantics: a frozen BatchNorm layer runs in eval mode (it
    normalises with, and keeps, its running statistics); with `freeze_statistics` every one does.
    Call `apply()` after model.train() and after any step that may change what is frozen
    (gradual unfreezing): a layer whose group thaws starts tracking again."""

    def __init__(self, model: nn.Module, freeze_statistics: bool = False) -> None:
        self.model = model
        self.freeze_statistics = freeze_statistics
        self.layers = [(layer, params) for layer, params in
                       zip(batchnorm_layers(model).values(), _owners(model).values())]  # fmt: skip

    def apply(self) -> None:
        for layer, params in self.layers:
            frozen = self.freeze_statistics or _frozen(params)
            if layer.training == frozen:  # only when it changes: train() recurses into children
                layer.train(not frozen)


def set_momentum(model: nn.Module, momentum: float | None) -> int:
    """Every BatchNorm layer's momentum (PyTorch's sense: the weight of the new batch); None keeps
    each layer's own. Returns the number of layers changed."""
    if momentum is None:
        return 0
    layers = batchnorm_layers(model)
    for layer in layers.values():
        layer.momentum = momentum
    return len(layers)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable,
    layers: set[str],
    forward: Callable[[object], object],
    *,
    max_batches: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Replace the running mean and variance of the named BatchNorm layers by the mean and
    (unbiased) variance of their inputs over up to `max_batches` batches, and return the rows used.

    The model runs as in training (the named layers in train mode, normalising each batch with
    its own statistics; dropout and every other layer in eval mode), with no gradients. Each
    layer's per-channel sums of x and x^2 and its element count are added up over the pass and,
    under DDP, over every rank (`all_reduce_sum`, one collective), so every rank ends with the
    same buffers: the statistics of all rows seen, not a momentum average. Batches beyond
    `max_batches` are drained unused, so a data iterator ends its epoch cleanly.
    """
    modules = batchnorm_layers(model)
    targets = {name: modules[name] for name in sorted(layers) if name in modules}
    if not targets:
        return 0
    sums = {name: torch.zeros(2 * layer.num_features + 1, dtype=torch.float64) for name, layer in targets.items()}

    def accumulate(name: str):
        def hook(layer: _BatchNorm, inputs: tuple) -> None:
            x = inputs[0].detach().double().transpose(0, 1).reshape(layer.num_features, -1)
            total = sums[name]
            total[: layer.num_features] += x.sum(dim=1).cpu()
            total[layer.num_features : -1] += x.square().sum(dim=1).cpu()
            total[-1] += x.shape[1]

        return hook

    modes = {module: module.training for module in model.modules()}
    # the pass's forwards count batches; what they tracked is replaced below, so the count is kept as it was
    tracked = {name: layer.num_batches_tracked.clone() for name, layer in targets.items()
               if layer.num_batches_tracked is not None}  # fmt: skip
    model.eval()
    hooks = []
    for name, layer in targets.items():
        layer.train()
        hooks.append(layer.register_forward_pre_hook(accumulate(name)))
    rows = 0
    try:
        for index, batch in enumerate(batches):
            if index < max_batches:
                forward(batch)
                rows += _rows(batch)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
        for name, count in tracked.items():
            targets[name].num_batches_tracked.copy_(count)
    flat = torch.cat(list(sums.values()))
    if all_reduce_sum is not None:
        flat = all_reduce_sum(flat)
    offset = 0
    for name, layer in targets.items():
        size = 2 * layer.num_features + 1
        total = flat[offset : offset + size]
        offset += size
        count = float(total[-1])
        if count < 2:  # no rows anywhere (an empty sample): keep what the layer has
            continue
        mean = total[: layer.num_features] / count
        variance = (total[layer.num_features : -1] / count - mean.square()).clamp(min=0) * (count / (count - 1))
        layer.running_mean.copy_(mean.to(layer.running_mean))
        layer.running_var.copy_(variance.to(layer.running_var))
    return rows


def _rows(batch) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return len(batch) if hasattr(batch, "__len__") else 0


def describe(model: nn.Module, frozen: set[str], recalibrate_batches: int | None, freeze_statistics: bool) -> str | None:
    """One line for the layer-group table and `finetune validate`: how many BatchNorm layers the
    model has and what happens to them; None for a model without any (text models)."""
    total = len(batchnorm_layers(model))
    if not total:
        return None
    if freeze_statistics:
        return (f"BatchNorm: {total} layers, all in eval mode throughout (model.batchnorm.freeze_statistics): "
                "the pretrained statistics are kept")  # fmt: skip
    tracking = total - len(frozen)
    parts = [f"BatchNorm: {total} layers"]
    if frozen:
        parts.append(f"{len(frozen)} frozen with their groups (eval mode, statistics kept while frozen)")
    if tracking:
        what = (f"recalibrated over up to {recalibrate_batches} training batches per worker before each validation"
                if recalibrate_batches else "running statistics as PyTorch tracks them, not recalibrated")
        parts.append(f"{tracking} trained ({what})")
    return ", ".join(parts)
