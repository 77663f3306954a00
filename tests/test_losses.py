"""Training losses against their formulas on hand-made batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finetune.config import ConfigError, LossConfig
from finetune.tasks.losses import FocalLoss, build_loss, class_weights

LABELS = ["a", "b", "c"]
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
TARGETS = torch.tensor([0, 2, 1, 0])


def by_hand(logits, targets, weights=(1.0, 1.0, 1.0), gamma=0.0, smoothing=0.0) -> float:
    """-sum_c w_c q_c (1 - p_c)^gamma log p_c per row, over the sum of the targets' weights."""
    total, weight_sum = 0.0, 0.0
    for row, target in zip(logits.tolist(), targets.tolist()):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        q = [(1 - smoothing) * (c == target) + smoothing / len(row) for c in range(len(row))]
        total += -sum(weights[c] * q[c] * (1 - p[c]) ** gamma * math.log(p[c]) for c in range(len(row)))
        weight_sum += weights[target]
    return total / weight_sum


def test_cross_entropy_and_label_smoothing_match_the_formula():
    assert build_loss(LossConfig(), LABELS)(LOGITS, TARGETS).item() == pytest.approx(by_hand(LOGITS, TARGETS))
    smoothed = build_loss(LossConfig(label_smoothing=0.1), LABELS)(LOGITS, TARGETS).item()
    assert smoothed == pytest.approx(by_hand(LOGITS, TARGETS, smoothing=0.1))
    assert smoothed == pytest.approx(nn.CrossEntropyLoss(label_smoothing=0.1)(LOGITS, TARGETS).item())


def test_focal_loss_is_its_formula_and_gamma_0_is_cross_entropy():
    for gamma in (0.5, 2.0):
        focal = build_loss(LossConfig(name="focal", gamma=gamma), LABELS)(LOGITS, TARGETS).item()
        assert focal == pytest.approx(by_hand(LOGITS, TARGETS, gamma=gamma))
        assert focal < by_hand(LOGITS, TARGETS)  # easy rows count less
    weights = torch.tensor([2.0, 1.0, 0.5])
    for smoothing in (0.0, 0.2):
        ce = nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)
        focal = FocalLoss(0.0, weights, smoothing)
        assert focal(LOGITS, TARGETS).item() == pytest.approx(ce(LOGITS, TARGETS).item(), rel=1e-6)
    soft = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=-1)  # mixup targets
    assert FocalLoss(0.0)(LOGITS, soft).item() == pytest.approx(nn.CrossEntropyLoss()(LOGITS, soft).item(), rel=1e-6)


def test_class_weights_given_or_balanced_change_the_loss_as_specified():
    given = build_loss(LossConfig(class_weights=[2.0, 1.0, 0.5]), LABELS)(LOGITS, TARGETS).item()
    assert given == pytest.approx(by_hand(LOGITS, TARGETS, weights=(2.0, 1.0, 0.5)))
    counts = {"a": 60, "b": 30, "c": 10}  # balanced: 100 / (3 x count)
    balanced = class_weights(LossConfig(class_weights="balanced"), LABELS, counts)
    assert balanced.tolist() == pytest.approx([100 / 180, 100 / 90, 100 / 30])
    loss = build_loss(LossConfig(class_weights="balanced"), LABELS, counts)(LOGITS, TARGETS).item()
    assert loss == pytest.approx(by_hand(LOGITS, TARGETS, weights=balanced.tolist()))
    alpha = class_weights(LossConfig(name="focal", class_weights=[2.0, 1.0, 1.0], alpha=[0.25, 0.5, 1.0]), LABELS, None)
    assert alpha.tolist() == pytest.approx([0.5, 0.5, 1.0])  # alpha_t multiplies the class weights


def test_class_weight_mistakes_are_named():
    with pytest.raises(ConfigError, match=r"loss.class_weights has 2 weights; the data has 3 labels \(a, b, c\)"):
        class_weights(LossConfig(class_weights=[1.0, 2.0]), LABELS, None)
    with pytest.raises(ConfigError, match=r"no training rows of class \['c'\]"):
        class_weights(LossConfig(class_weights="balanced"), LABELS, {"a": 3, "b": 1})
    with pytest.raises(ValueError, match="at least one > 0"):
        LossConfig(class_weights=[0.0, 0.0])
