"""The one setup chain from a built model to what trains it, used by the worker loop,
`finetune validate` (on the meta device), the benchmarks and the tests alike, so they cannot
drift:

  BatchNorm momentum/sync -> strategy.adapt -> layer_groups -> strategy.setup
  -> (device, train.compile, DDP on workers) -> weight-decay split -> optimizer -> scheduler
  (-> the strategy's per-phase rates) -> BatchNorm train modes

Plain PyTorch: DDP comes in as the worker's `wrap` callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from finetune.config import PipelineConfig, metric_mode
from finetune.models import batchnorm
from finetune.models.groups import LayerGroup, layer_groups
from finetune.strategies import Strategy, build_strategy
from finetune.training import optim, steps


@dataclass
class Training:
    """A model made ready to fine-tune."""

    model: nn.Module  # what a training step calls: the DDP wrapper on workers, else `module`
    module: nn.Module  # the model itself: evaluated, checkpointed, exported
    strategy: Strategy
    groups: list[LayerGroup]  # input -> output
    param_groups: list[dict]  # the strategy's, one per layer group (before the weight-decay split)
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_modes: batchnorm.TrainModes  # BatchNorm layers of frozen groups in eval mode

    def describe_groups(self) -> list[dict]:
        """One row per layer group: its size and learning rate (the schedule's peak, times the
        strategy's first-phase multiplier if it has one; None: frozen for good)."""
        lrs = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        scales = self.strategy.lr_scales(0, 0) if self.strategy.scales_lr else {}

        def start_lr(group: LayerGroup) -> float | None:
            lr = next((lrs[id(p)] for p in group.params.values() if id(p) in lrs), None)
            return None if lr is None else lr * scales.get(group.name, 1.0)

        return [
            {"group": group.name, "params": group.size, "lr": start_lr(group),
             "trainable_now": sum(p.numel() for p in group.params.values() if p.requires_grad)}
            for group in self.groups
        ]  # fmt: skip

    def describe_batchnorm(self, cfg: PipelineConfig, recalibrating: bool) -> str | None:
        """What happens to the model's BatchNorm layers (None: it has none)."""
        bn = cfg.model.batchnorm
        return batchnorm.describe(self.module, batchnorm.frozen_layers(self.module),
                                  bn.recalibrate_batches if recalibrating else None, bn.freeze_statistics)  # fmt: skip


Wrap = Callable[[nn.Module, list[dict], bool], nn.Module]


def build_training(
    cfg: PipelineConfig, model: nn.Module, steps_per_epoch: int, *, world_size: int = 1,
    device: torch.device | None = None, wrap: Wrap | None = None, fused: bool | None = None,
) -> Training:  # fmt: skip
    """`model` as built (pretrained body, new head) through the strategy to its optimizer and
    schedule. `device`: move the model there first (None: leave it, e.g. on the meta device).
    `wrap(model, param_groups, freezes)`: the DDP wrapper on workers. `fused`: the optimizer's
    fused kernels (default: when every parameter is on a GPU or every one on the CPU)."""
    batchnorm.set_momentum(model, cfg.model.batchnorm.momentum)
    if cfg.model.batchnorm.sync and world_size > 1:  # same Parameter objects: groups and strategies are unaffected
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    strategy = build_strategy(cfg.strategy)
    strategy.adapt(model)
    groups = layer_groups(model, cfg.model.layer_groups)
    param_groups = strategy.setup(model, groups, cfg.optim.lr)
    if device is not None:
        model = steps.to_device(model, device)
    if cfg.train.compile:  # compiles at its first call; state_dict keys and copies (EMA) stay the plain model's
        model.compile(dynamic=True)
    wrapped = wrap(model, param_groups, strategy.freezes) if wrap else model
    optimizer = optim.build_optimizer(optim.split_weight_decay(param_groups, model, cfg.optim), cfg.optim, fused=fused)
    scheduler = optim.build_scheduler(optimizer, cfg.schedule, steps_per_epoch * cfg.train.epochs, steps_per_epoch,
                                      plateau_mode=metric_mode(cfg.schedule.metric))  # fmt: skip
    if strategy.scales_lr:
        scheduler = optim.StrategyScaledSchedule(scheduler, optimizer, strategy, steps_per_epoch)
    return Training(wrapped, model, strategy, groups, param_groups, optimizer, scheduler,
                    batchnorm.TrainModes(model, cfg.model.batchnorm.freeze_statistics))  # fmt: skip
