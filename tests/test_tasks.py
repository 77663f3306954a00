"""Task types: each loss against its formula, each metric against a hand computation, the
task's settings checked against the config, and predictions as `finetune predict` prints them."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.config import ConfigError, LossConfig, TaskConfig, parse
from finetune.train.tasks import Classification, MultiLabel, Regression, build_task, task_from_json

LABELS = ["a", "b", "c"]
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [0.0, 0.3, 1.0], [1.0, 1.0, -1.0]])
MULTI_HOT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def _bce_by_hand(logits, target, pos_weight=None):
    p = torch.sigmoid(logits)
    w = torch.ones(logits.shape[-1]) if pos_weight is None else pos_weight
    return (-(w * target * torch.log(p) + (1 - target) * torch.log(1 - p))).mean().item()


def test_classification_metrics_match_hand_computation():
    task = Classification(LABELS)
    rows = {"loss": torch.full((6,), 0.5), "target": torch.tensor([0, 0, 1, 1, 2, 2]),
            "prediction": torch.tensor([0, 1, 1, 1, 2, 0])}  # fmt: skip
    metrics = task.metrics(rows, "val")
    assert metrics["val/accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (2 + 3), 2 * 1 / (2 + 1)]  # per class: 2TP / (support + predicted)
    assert metrics["val/macro_f1"] == pytest.approx(sum(f1) / 3)
    assert metrics["val/loss"] == pytest.approx(0.5) and metrics["val/samples"] == 6


def test_multi_label_losses_equal_their_formulas():
    task = MultiLabel(LABELS, 0.5)
    plain = task.training_loss(parse_loss("multi_label"), None)
    assert plain(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT))
    # balanced positive weights: negative rows / positive rows of each label (2/2, 2/2, 2/2 here ... and 3/1)
    stats = {"rows": 4, "sums": [2.0, 2.0, 1.0], "squares": 0.0}
    balanced = task.training_loss(parse_loss("multi_label", class_weights="balanced"), stats)
    weights = torch.tensor([1.0, 1.0, 3.0])
    assert balanced(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT, weights))
    # label smoothing moves each target toward 1/2
    smoothed = task.training_loss(parse_loss("multi_label", label_smoothing=0.2), None)
    assert smoothed(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT * 0.8 + 0.1))
    # sigmoid focal: gamma 0 and no alpha is BCE; gamma 2, alpha 0.25 is the paper's formula
    focal0 = task.training_loss(parse_loss("multi_label", name="focal", gamma=0.0), None)
    assert focal0(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT), rel=1e-5)
    focal = task.training_loss(parse_loss("multi_label", name="focal", gamma=2.0, alpha=0.25), None)
    p = torch.sigmoid(LOGITS)
    p_t = p * MULTI_HOT + (1 - p) * (1 - MULTI_HOT)
    alpha_t = 0.25 * MULTI_HOT + 0.75 * (1 - MULTI_HOT)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean().item()
    assert focal(LOGITS, MULTI_HOT).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="no training row has label"):
        task.training_loss(parse_loss("multi_label", class_weights="balanced"), {"rows": 4, "sums": [2, 0, 1], "squares": 0})


def parse_loss(task: str, **loss) -> LossConfig:
    return parse({"data": {"source": "x.csv"}, "model": {"name": "x"}, "task": {"type": task}, "loss": loss}).loss


def test_multi_label_metrics_match_hand_computation():
    task = MultiLabel(LABELS, [0.5, 0.5, 0.7])
    probability = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.4, 0.6, 0.8], [0.7, 0.4, 0.1]])
    target = MULTI_HOT.to(torch.uint8)
    metrics = task.metrics({"loss": torch.full((4,), 0.25), "target": target, "probability": probability}, "val")
    # predicted at the thresholds: a: rows 0, 3; b: rows 1, 2; c (0.7): row 2 only
    # a: TP 2 FP 0 FN 0 -> F1 1; b: TP 1 (row 1) FP 1 (row 2) FN 1 (row 3) -> 0.5; c: TP 1 FP 0 FN 1 -> 2/3
    assert metrics["val/macro_f1"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert metrics["val/micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # TP 4, FP 1, FN 2
    # average precision per label (rank by score, precision at each positive):
    # a: positives ranked 1, 2 -> 1; b: scores .8(+) .6(-) .4(+) .2 -> (1 + 2/3) / 2; c: .8(+) .6(+) -> 1
    assert metrics["val/map"] == pytest.approx((1 + (1 + 2 / 3) / 2 + 1) / 3)
    assert metrics["val/loss"] == pytest.approx(0.25)
    rows = task.eval_rows(LOGITS, MULTI_HOT)
    assert rows["loss"].mean().item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT))
    prediction = task.predict(torch.tensor([[2.0, -2.0, 0.5]]))[0]  # sigmoid 0.88, 0.12, 0.62 (< 0.7)
    assert prediction["labels"] == ["a"] and prediction["probabilities"]["c"] == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


def test_regression_trains_on_the_standardised_target_and_reports_its_own_units():
    stats = {"rows": 4, "sums": [20.0], "squares": 4 * 25.0 + 4 * 4.0}  # mean 5, std 2
    task = build_task(TaskConfig(type="regression"), ["price"], stats)
    assert (task.mean, task.std, task.num_outputs) == (5.0, 2.0, 1)
    outputs = torch.tensor([[0.5], [-1.0], [0.0], [2.0]])  # standardised predictions: 6, 3, 5, 9
    target = torch.tensor([7.0, 3.0, 4.0, 9.0])
    mse = task.training_loss(parse_loss("regression"), stats)
    assert mse(outputs, target).item() == pytest.approx(((0.5 - 1.0) ** 2 + 0 + 0.5**2 + 0) / 4)
    huber = task.training_loss(parse_loss("regression", name="huber", delta=0.25), stats)
    # |error| 0.5 > delta: delta * (|e| - delta / 2) = 0.25 * 0.375 each; two such rows of four
    assert huber(outputs, target).item() == pytest.approx(2 * 0.25 * 0.375 / 4)
    metrics = task.metrics(task.eval_rows(outputs, target), "test")
    errors = [-1.0, 0.0, 1.0, 0.0]
    assert metrics["test/mae"] == pytest.approx(0.5)
    assert metrics["test/rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))
    assert metrics["test/loss"] == pytest.approx(0.5)
    total = sum((t - 5.75) ** 2 for t in target.tolist())
    assert metrics["test/r2"] == pytest.approx(1 - 2.0 / total)
    assert task.predict(torch.tensor([[1.5]])) == [{"value": pytest.approx(8.0)}]
    unscaled = build_task(TaskConfig(type="regression", normalize_targets=False), ["price"], stats)
    assert (unscaled.mean, unscaled.std) == (0.0, 1.0)


def test_tasks_round_trip_through_their_saved_form():
    for task in (Classification(LABELS), MultiLabel(LABELS, [0.3, 0.5, 0.9]), Regression(["y"], 2.5, 0.5)):
        again = task_from_json(task.to_json(), task.label_names)
        assert type(again) is type(task) and again.to_json() == task.to_json()
    assert isinstance(task_from_json({"type": "classification"}, LABELS), Classification)


def test_classification_loss_is_cross_entropy_on_the_class_index():
    loss = Classification(LABELS).training_loss(parse_loss("classification"), None)
    target = torch.tensor([0, 1, 2, 0])
    assert loss(LOGITS, target).item() == pytest.approx(F.cross_entropy(LOGITS, target).item())


@pytest.mark.parametrize(
    "section, message",
    [
        ({"task": {"type": "regression"}, "loss": {"name": "focal"}}, "loss.name=focal is not a regression loss"),
        ({"task": {"type": "multi_label"}, "checkpoint": {"metric": "val/accuracy"}},
         "checkpoint.metric=val/accuracy: a multi_label task reports val/micro_f1, val/macro_f1, val/map, val/loss"),
        ({"task": {"type": "regression"}, "train": {"early_stopping": {"metric": "val/map"}}},
         "train.early_stopping.metric=val/map"),
        ({"task": {"type": "regression"}, "data": {"source": "x.csv", "mixup_alpha": 0.2}}, "mixup_alpha"),
        ({"task": {"type": "classification", "threshold": [0.5, 0.5]}}, "per-label thresholds are for multi_label"),
        ({"task": {"type": "regression"}, "loss": {"class_weights": "balanced"}}, "a regression target has no classes"),
        ({"task": {"type": "multi_label"}, "loss": {"name": "focal", "alpha": [0.2, 0.3]}}, "one number in (0, 1)"),
        ({"task": {"type": "multi_label", "threshold": 1.0}}, "strictly between 0 and 1"),
        ({"task": {"type": "ranking"}}, "task.type"),
    ],
)  # fmt: skip
def test_settings_that_do_not_fit_the_task_are_config_errors(section, message):
    raw = {"data": {"source": "x.csv"}, "model": {"name": "x"}, **section}
    with pytest.raises(ConfigError) as error:
        parse(raw)
    assert message in str(error.value)


def test_task_defaults_fill_loss_metric_and_mode():
    def resolved(task):
        cfg = parse({"data": {"source": "x.csv"}, "model": {"name": "x"}, "task": {"type": task}})
        return cfg.loss.name, cfg.checkpoint.metric, cfg.checkpoint.mode

    assert resolved("classification") == ("cross_entropy", "val/accuracy", "max")
    assert resolved("multi_label") == ("bce", "val/map", "max")
    assert resolved("regression") == ("mse", "val/rmse", "min")


def test_a_wrong_number_of_thresholds_is_a_config_error():
    with pytest.raises(ConfigError, match=r"task.threshold has 2 values; the data has 3 labels \(a, b, c\)"):
        build_task(TaskConfig(type="multi_label", threshold=[0.5, 0.6]), LABELS)
