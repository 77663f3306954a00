"""The yardsticks' linear models (scikit-learn), fit on fixed features: logistic regression
(classification), one per label (multi_label), ridge (regression), the strength chosen on the
validation split by the run's metric. A fitted one is a weight and a bias in the task's head's
terms (class logits, per-label logits, the value): outputs = features @ weight.T + bias."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from finetune.config import lower_is_better
from finetune.tasks import Task

MODELS = {"classification": "logistic regression", "multi_label": "a logistic regression per label",
          "regression": "ridge regression"}  # fmt: skip
# Logistic regression's C, ridge's 1/alpha: tried on val, the best kept. Strongest regularisation
# first: each logistic fit starts from the last one's solution (the path sklearn's own
# LogisticRegressionCV walks), which took an image yardstick's three fits from ~30 s to ~15 s.
STRENGTHS = (0.5, 2.0, 8.0)
LOGIT_FLOOR = -16.0  # a class (or label) the training split never has: its logit, about 1e-7 probability


def linear_outputs(features, weight: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    """What the head would output for these rows (features: a dense or sparse matrix)."""
    return torch.as_tensor(np.asarray(features @ weight.T) + bias, dtype=torch.float32)


def score(task: Task, outputs: torch.Tensor, labels: np.ndarray, prefix: str) -> tuple[dict[str, float], dict]:
    """The task's metrics of these outputs (`{prefix}/<metric>`) and the per-row results."""
    targets = torch.as_tensor(labels, dtype=torch.long if task.type == "classification" else torch.float32)
    rows = task.eval_rows(outputs, targets)
    return task.metrics(rows, prefix), rows


def fit_linear(task: Task, features, labels: np.ndarray, val_features, val_labels: np.ndarray,
               metric: str) -> tuple[np.ndarray, np.ndarray, str]:  # fmt: skip
    """(weight, bias, the setting kept in words, e.g. "C=2") of the task's linear model, its
    strength chosen on val by `metric` (a name the task reports); without val rows, the middle one."""
    best, warm = None, {}
    for strength in STRENGTHS if val_features is not None else STRENGTHS[1:2]:
        weight, bias = _fit_one(task, features, labels, strength, warm)
        value = 0.0
        if val_features is not None:
            value = score(task, linear_outputs(val_features, weight, bias), val_labels, "val")[0][f"val/{metric}"]
        key = -value if lower_is_better(metric) else value
        if best is None or key > best[0]:
            best = (key, strength, weight, bias)
    _, strength, weight, bias = best
    return weight, bias, f"alpha={1 / strength:g}" if task.type == "regression" else f"C={strength:g}"


def _logistic(warm: dict, key, strength: float) -> LogisticRegression:
    """The logistic regression of this label (or of all classes) at this strength, starting from
    its solution at the previous strength when there was one."""
    model = warm.setdefault(key, LogisticRegression(max_iter=2000, warm_start=True))
    return model.set_params(C=strength)


def _fit_one(task: Task, features, labels: np.ndarray, strength: float, warm: dict) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of the task's linear model at this strength, as the task's head would hold
    them; `warm` keeps the logistic models between strengths."""
    width = features.shape[1]
    if task.type == "regression":
        ridge = Ridge(alpha=1.0 / strength).fit(features, labels.astype(np.float64))
        return ridge.coef_.reshape(1, width).astype(np.float32), np.array([ridge.intercept_], dtype=np.float32)
    weight = np.zeros((task.num_outputs, width), dtype=np.float32)
    bias = np.full(task.num_outputs, LOGIT_FLOOR, dtype=np.float32)
    if task.type == "multi_label":  # one logistic regression per label; a label always (or never) on is constant
        for label, column in enumerate(labels.astype(np.int64).T):
            if column.min() == column.max():
                bias[label] = -LOGIT_FLOOR if column[0] else LOGIT_FLOOR
                continue
            model = _logistic(warm, label, strength).fit(features, column)
            weight[label], bias[label] = model.coef_[0], model.intercept_[0]
        return weight, bias
    targets = labels.astype(np.int64)
    classes = np.unique(targets)
    if len(classes) == 1:
        bias[classes[0]] = 0.0
        return weight, bias
    model = _logistic(warm, "classes", strength).fit(features, targets)
    if len(classes) == 2:  # one decision score: p(second class) = sigmoid(score) = softmax([0, score])
        weight[classes[1]], bias[classes[1]] = model.coef_[0], model.intercept_[0]
        bias[classes[0]] = 0.0
    else:  # multinomial: softmax over the classes' scores is predict_proba
        weight[classes], bias[classes] = model.coef_, model.intercept_
    return weight, bias
