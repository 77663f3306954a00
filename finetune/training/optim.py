"""Optimizer and learning-rate schedule of a run, from the pipeline's `optim` and `schedule`
sections. Plain PyTorch (no Ray), like the rest of the step code.

The strategy decides the parameter groups (what trains, at which learning rate); this module
only splits each group into a decayed and an undecayed half (biases, normalisation layers)
and builds the torch optimizer and schedule over them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from finetune.config import OptimConfig, ScheduleConfig

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def no_decay_names(model: nn.Module, patterns: list[str]) -> set[str]:
    """Names of the parameters weight decay skips: 'bias', 'norm' (weights of normalisation
    layers, by module type or, for models with their own norm classes, 'norm' in the name)
    and regexes on the names."""
    regexes = [re.compile(p) for p in patterns if p not in ("bias", "norm")]
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_LAYERS) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if (("bias" in patterns and param_name == "bias") or ("norm" in patterns and is_norm)
                    or any(r.search(name) for r in regexes)):  # fmt: skip
                names.add(name)
    return names


def split_weight_decay(param_groups: list[dict], model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Each strategy group as two: its decayed parameters (cfg.weight_decay) and the rest
    (weight_decay 0); both keep the group's learning rate and name."""
    skipped_names = no_decay_names(model, cfg.no_decay)
    skip = {id(p) for name, p in model.named_parameters() if name in skipped_names}
    out = []
    for group in param_groups:
        params = list(group["params"])
        for decayed in (True, False):
            part = [p for p in params if (id(p) not in skip) == decayed]
            if part:
                out.append({**group, "params": part, "weight_decay": cfg.weight_decay if decayed else 0.0})
    return out


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """`fused` (default: when every parameter is on a GPU or every one on the CPU): one kernel
    for the whole update instead of a few per tensor, which a small model's GPU step notices
    (bench/gpu.py); on the CPU MiniLM's whole training step is ~8% faster (bench/fused_optimizer.py)."""
    param_groups = [{**group, "params": list(group["params"])} for group in param_groups]  # may be generators
    if fused is None:
        devices = {p.device.type for group in param_groups for p in group["params"]}
        fused = devices in ({"cuda"}, {"cpu"})
    fused = fused or None
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused, **common)
    if cfg.name == "adam":
        return torch.optim.Adam(param_groups, betas=cfg.betas, eps=cfg.eps, fused=fused, **common)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(param_groups, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, **common)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(param_groups, eps=cfg.eps, fused=fused, **common)
    return torch.optim.AdamW(param_groups, betas=cfg.betas, eps=cfg.eps, fused=fused, **common)


class WarmupThenPlateau:
    """Linear warmup per step, then torch's ReduceLROnPlateau on a validation metric per epoch.
    The run calls step() after every optimizer step and epoch_end(metric) after each validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, warmup: int, mode: str) -> None:
        self.warmup, self.steps = warmup, 0
        self.warming = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step / warmup, 1.0)) if warmup else None
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.gamma, patience=cfg.patience
        )  # fmt: skip
        self.optimizer = optimizer

    def step(self) -> None:
        self.steps += 1
        if self.warming is not None and self.steps <= self.warmup:
            self.warming.step()

    def epoch_end(self, metric: float) -> None:
        if self.steps >= self.warmup:
            self.plateau.step(metric)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "plateau": self.plateau.state_dict(),
                "warming": self.warming.state_dict() if self.warming else None}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.plateau.load_state_dict(state["plateau"])
        if self.warming is not None:
            self.warming.load_state_dict(state["warming"])


class StrategyScaledSchedule:
    """The run's schedule, then the strategy's multipliers per layer group (`lr_scales`, e.g.
    LP-FT's probe rate for the head). The schedule itself always sees and sets its own rates
    (they are put back in the optimizer around each of its calls), so chained schedules such as
    ReduceLROnPlateau do not compound the multipliers, and a resumed run restores both."""

    def __init__(self, scheduler, optimizer: torch.optim.Optimizer, strategy, steps_per_epoch: int) -> None:
        self.inner, self.optimizer, self.strategy = scheduler, optimizer, strategy
        self.steps_per_epoch, self.steps = max(steps_per_epoch, 1), 0
        self.unscaled = [group["lr"] for group in optimizer.param_groups]
        self._scale()

    def _scale(self) -> None:
        scales = self.strategy.lr_scales(self.steps // self.steps_per_epoch, self.steps)
        for group, lr in zip(self.optimizer.param_groups, self.unscaled):
            group["lr"] = lr * scales.get(group.get("name"), 1.0)

    def _call(self, method, *args) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.unscaled):
            group["lr"] = lr
        method(*args)
        self.unscaled = [group["lr"] for group in self.optimizer.param_groups]
        self._scale()

    def step(self) -> None:
        self.steps += 1
        self._call(self.inner.step)

    def epoch_end(self, metric: float) -> None:
        if hasattr(self.inner, "epoch_end"):  # schedule.name=plateau
            self._call(self.inner.epoch_end, metric)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "steps": self.steps, "unscaled": self.unscaled}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.steps, self.unscaled = state["steps"], state["unscaled"]
        self._scale()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int = 1,
    plateau_mode: str = "max",
):  # fmt: skip
    """The learning-rate schedule, stepped once per optimizer step; the factor multiplies each
    group's own (strategy-set) learning rate. `plateau_mode`: max or min, the plateau metric's."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.name == "plateau":
        return WarmupThenPlateau(optimizer, cfg, warmup, plateau_mode)
    if cfg.name == "one_cycle":
        cycles_momentum = "momentum" in optimizer.defaults and optimizer.defaults["momentum"] > 0 or "betas" in optimizer.defaults
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
            pct_start=max(cfg.warmup_ratio, 1.0 / total_steps), cycle_momentum=cycles_momentum,
        )  # fmt: skip
    if cfg.name == "step":  # epochs of the whole run, warmup included
        every = cfg.step_epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: step / warmup if step < warmup else cfg.gamma ** (step // every)
        )  # fmt: skip
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine_restarts": "cosine_with_restarts"}.get(cfg.name, cfg.name)
    kwargs = {} if name == "constant_with_warmup" else {"num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["scheduler_specific_kwargs"] = {"num_cycles": cfg.num_cycles}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, **kwargs)
