"""Optimizers, the weight-decay split and every learning-rate schedule, step by step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finetune.config import OptimConfig, ScheduleConfig
from finetune.training import optim

PEAK = 0.1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)
        self.ln = nn.LayerNorm(2)
        self.head = nn.Linear(2, 2)


def test_each_optimizer_is_the_torch_one_with_its_settings():
    params = [nn.Parameter(torch.zeros(2))]
    cases = {
        "adamw": (torch.optim.AdamW, {"betas": (0.8, 0.9), "eps": 1e-6}),
        "adam": (torch.optim.Adam, {"betas": (0.8, 0.9), "eps": 1e-6}),
        "sgd": (torch.optim.SGD, {"momentum": 0.5, "nesterov": True}),
        "rmsprop": (torch.optim.RMSprop, {"alpha": 0.9, "momentum": 0.5, "eps": 1e-6}),
        "adagrad": (torch.optim.Adagrad, {"eps": 1e-6}),
    }
    for name, (cls, expected) in cases.items():
        cfg = OptimConfig(name=name, lr=0.3, weight_decay=0.02, betas=(0.8, 0.9), eps=1e-6, momentum=0.5,
                          nesterov=name == "sgd", alpha=0.9)  # fmt: skip
        optimizer = optim.build_optimizer([{"params": params}], cfg)
        assert type(optimizer) is cls, name
        group = optimizer.param_groups[0]
        assert group["lr"] == 0.3 and group["weight_decay"] == 0.02
        assert {k: group[k] for k in expected} == expected, name
    with pytest.raises(ValueError, match="optim.nesterov needs optim.name=sgd with optim.momentum > 0"):
        OptimConfig(name="sgd", momentum=0.0, nesterov=True)


def test_weight_decay_skips_biases_and_norm_layers_and_keeps_the_strategy_groups():
    net = Net()
    strategy_groups = [
        {"params": [*net.conv.parameters(), *net.bn.parameters(), *net.fc.parameters(), *net.ln.parameters()],
         "lr": 0.01, "name": "backbone"},
        {"params": list(net.head.parameters()), "lr": 0.1, "name": "head"},
    ]  # fmt: skip
    names = {id(p): n for n, p in net.named_parameters()}

    def split(cfg: OptimConfig) -> list[tuple[str, float, float, list[str]]]:
        groups = optim.split_weight_decay(strategy_groups, net, cfg)
        return [(g["name"], g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]

    assert split(OptimConfig(weight_decay=0.05)) == [
        ("backbone", 0.01, 0.05, ["conv.weight", "fc.weight"]),
        ("backbone", 0.01, 0.0, ["bn.bias", "bn.weight", "conv.bias", "fc.bias", "ln.bias", "ln.weight"]),
        ("head", 0.1, 0.05, ["head.weight"]),
        ("head", 0.1, 0.0, ["head.bias"]),
    ]
    assert split(OptimConfig(weight_decay=0.05, no_decay=[])) == [
        ("backbone", 0.01, 0.05, ["bn.bias", "bn.weight", "conv.bias", "conv.weight", "fc.bias", "fc.weight",
                                  "ln.bias", "ln.weight"]),
        ("head", 0.1, 0.05, ["head.bias", "head.weight"]),
    ]  # fmt: skip
    assert split(OptimConfig(weight_decay=0.05, no_decay=[r"^head\."]))[-1] == ("head", 0.1, 0.0, ["head.bias", "head.weight"])
    with pytest.raises(ValueError, match="neither 'bias', 'norm' nor a regex"):
        OptimConfig(no_decay=["(unclosed"])


def lr_curve(cfg: ScheduleConfig, total: int, steps_per_epoch: int = 10, optimizer_name: str = "sgd") -> list[float]:
    """The learning rate each optimizer step runs with."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer([{"params": [param]}], OptimConfig(name=optimizer_name, lr=PEAK))
    scheduler = optim.build_scheduler(optimizer, cfg, total, steps_per_epoch)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def warm(step: int, warmup: int) -> float | None:
    return PEAK * step / warmup if step < warmup else None


@pytest.mark.parametrize(
    ("name", "after_warmup"),
    [
        ("constant", lambda s, w, t: PEAK),
        ("linear", lambda s, w, t: PEAK * (t - s) / (t - w)),
        ("cosine", lambda s, w, t: PEAK * 0.5 * (1 + math.cos(math.pi * (s - w) / (t - w)))),
        ("cosine_restarts", lambda s, w, t: PEAK * 0.5 * (1 + math.cos(math.pi * ((2 * (s - w) / (t - w)) % 1.0)))),
        ("step", lambda s, w, t: PEAK * 0.5 ** (s // 10)),  # x gamma every step_epochs=1 epoch of 10 steps
    ],
)
def test_each_schedule_follows_its_documented_curve(name, after_warmup):
    total, warmup = 40, 4
    cfg = ScheduleConfig(name=name, warmup_ratio=warmup / total, num_cycles=2, gamma=0.5, step_epochs=1)
    expected = [warm(s, warmup) if s < warmup else after_warmup(s, warmup, total) for s in range(total)]
    assert lr_curve(cfg, total) == pytest.approx(expected, abs=1e-9)


def test_one_cycle_is_torchs_with_warmup_ratio_as_its_warm_phase():
    total = 40
    curve = lr_curve(ScheduleConfig(name="one_cycle", warmup_ratio=0.25), total, optimizer_name="adamw")
    peak_at = curve.index(max(curve))
    assert max(curve) == pytest.approx(PEAK) and peak_at == pytest.approx(0.25 * total, abs=1)
    assert curve[0] == pytest.approx(PEAK / 25) and curve[-1] < PEAK / 1e3  # torch's div factors
    assert all(a <= b for a, b in zip(curve[:peak_at], curve[1 : peak_at + 1]))
    assert all(a >= b for a, b in zip(curve[peak_at:], curve[peak_at + 1 :]))


def test_plateau_warms_up_then_cuts_the_rate_when_the_metric_stalls():
    param = nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer([{"params": [param]}], OptimConfig(name="sgd", lr=PEAK))
    scheduler = optim.build_scheduler(optimizer, ScheduleConfig(name="plateau", warmup_ratio=0.1, gamma=0.5, patience=1),
                                      total_steps=50, steps_per_epoch=10, plateau_mode="max")  # fmt: skip
    lrs = []
    for epoch, val_accuracy in enumerate([0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]):
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        scheduler.epoch_end(val_accuracy)
    assert lrs[:6] == pytest.approx([PEAK * s / 5 for s in range(5)] + [PEAK])
    per_epoch = [lrs[10 * e + 9] for e in range(7)]
    # two epochs without improvement (more than patience 1): halved after epoch 4, again after epoch 7
    assert per_epoch == pytest.approx([PEAK, PEAK, PEAK, PEAK, PEAK / 2, PEAK / 2, PEAK / 2])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(PEAK / 4)
    restored = optim.build_scheduler(optimizer, ScheduleConfig(name="plateau", warmup_ratio=0.1), 50, 10)
    restored.load_state_dict(scheduler.state_dict())  # a resumed run continues the count
    assert restored.steps == 70 and restored.plateau.best == 0.7
