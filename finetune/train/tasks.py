"""What the task type changes: the head's width, the training loss, the validation metrics and
what a prediction says. Plain PyTorch and scikit-learn's metrics (no Ray), so evaluation runs
the same in a worker, in `finetune evaluate` and in a bare benchmark.

Evaluation keeps per-row results (`eval_rows`), which DDP ranks gather before `metrics`: mAP
needs every score of a label at once, and one path for all tasks keeps them comparable.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch import nn

from finetune.config import TASK_METRICS, ConfigError, LossConfig, TaskConfig
from finetune.train import losses


class Task:
    type: str = ""

    def __init__(self, label_names: list[str]) -> None:
        self.label_names = list(label_names)

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return TASK_METRICS[self.type]

    def training_loss(self, cfg: LossConfig, stats: dict | None) -> nn.Module:
        raise NotImplementedError

    def eval_rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row results on the CPU; `loss` is the task's plain loss (comparable across loss settings)."""
        raise NotImplementedError

    def scores(self, rows: dict[str, np.ndarray]) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> list[dict]:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"type": self.type}

    def metrics(self, rows: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        """`{prefix}/<metric>` for every metric of the task, plus the row count."""
        count = len(rows["loss"])
        if count == 0:
            values = dict.fromkeys(self.metric_names, 0.0)
        else:
            values = {"loss": float(rows["loss"].double().mean()),
                      **self.scores({k: v.numpy() for k, v in rows.items()})}  # fmt: skip
        return {**{f"{prefix}/{name}": values[name] for name in self.metric_names}, f"{prefix}/samples": count}

    def constant_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`rows` with the outputs of the best model that ignores its input (see subclasses)."""
        raise NotImplementedError

    def constant_metrics(self, rows: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        """`constant_{prefix}/<metric>`: what a predictor that ignores its input scores on these rows
        (the yardstick a model that learned nothing reaches); no loss."""
        if len(rows["loss"]) == 0:
            return {}
        scores = self.scores(self.constant_rows({k: v.numpy() for k, v in rows.items()}))
        return {f"constant_{prefix}/{name}": value for name, value in scores.items()}


class Classification(Task):
    """One class per row: softmax over the classes."""

    type = "classification"

    def training_loss(self, cfg: LossConfig, stats: dict | None) -> nn.Module:
        counts = dict(zip(self.label_names, stats["sums"])) if stats else None
        return losses.build_loss(cfg, self.label_names, counts)

    def eval_rows(self, outputs, targets):
        return {"loss": F.cross_entropy(outputs, targets, reduction="none").cpu(),
                "target": targets.cpu(), "prediction": outputs.argmax(dim=-1).cpu()}  # fmt: skip

    def scores(self, rows):
        target, prediction = rows["target"], rows["prediction"]
        # macro-F1 over the classes in labels or predictions (scikit-learn's default label set)
        return {"accuracy": float((target == prediction).mean()),
                "macro_f1": float(skm.f1_score(target, prediction, average="macro", zero_division=0))}  # fmt: skip

    def constant_rows(self, rows):
        """Every row predicted as the split's most common class."""
        return {**rows, "prediction": np.full_like(rows["prediction"], np.bincount(rows["target"]).argmax())}

    def predict(self, outputs):
        results = []
        for row in torch.softmax(outputs.float(), dim=-1):
            best = int(row.argmax())
            results.append({"label": self.label_names[best], "probability": float(row[best]),
                            "probabilities": dict(zip(self.label_names, row.tolist()))})  # fmt: skip
        return results


class MultiLabel(Task):
    """Any number of labels per row: a sigmoid per label, predicted at or above its threshold."""

    type = "multi_label"

    def __init__(self, label_names: list[str], threshold: float | list[float]) -> None:
        super().__init__(label_names)
        thresholds = threshold if isinstance(threshold, list) else [threshold] * len(label_names)
        if len(thresholds) != len(label_names):
            raise ConfigError([f"task.threshold has {len(thresholds)} values; the data has {len(label_names)} "
                               f"labels ({', '.join(label_names)})"])  # fmt: skip
        self.thresholds = [float(t) for t in thresholds]

    def training_loss(self, cfg, stats):
        positives, rows = (stats["sums"], stats["rows"]) if stats else (None, 0)
        return losses.MultiLabelLoss(cfg, losses.positive_weights(cfg, self.label_names, positives, rows))

    def eval_rows(self, outputs, targets):
        loss = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=-1)
        return {"loss": loss.cpu(), "target": targets.to(torch.uint8).cpu(), "probability": torch.sigmoid(outputs).cpu()}

    def scores(self, rows):
        target, probability = rows["target"], rows["probability"]
        predicted = (probability >= np.asarray(self.thresholds, dtype=np.float32)).astype(np.uint8)
        # macro-F1 over the labels present in targets or predictions, as for classification
        macro = skm.f1_score(target, predicted, average="macro", zero_division=np.nan)
        present = target.sum(axis=0) > 0  # average precision is undefined for a label with no positive row
        average_precision = (
            skm.average_precision_score(target[:, present], probability[:, present], average="macro")
            if present.any() else 0.0
        )  # fmt: skip
        return {"micro_f1": float(skm.f1_score(target, predicted, average="micro", zero_division=0)),
                "macro_f1": 0.0 if math.isnan(macro) else float(macro), "map": float(average_precision)}  # fmt: skip

    def constant_rows(self, rows):
        """Every label predicted for every row, with one score (micro-F1 of all-on; mAP = prevalence)."""
        return {**rows, "probability": np.ones_like(rows["probability"])}

    def predict(self, outputs):
        results = []
        for row in torch.sigmoid(outputs.float()):
            results.append({"labels": [name for name, p, t in zip(self.label_names, row.tolist(), self.thresholds) if p >= t],
                            "probabilities": dict(zip(self.label_names, row.tolist()))})  # fmt: skip
        return results

    def to_json(self):
        return {"type": self.type, "thresholds": self.thresholds}


class Regression(Task):
    """A numeric target: one output, trained on the standardised target (mean, std of the
    training split), reported and predicted in the target's own units."""

    type = "regression"

    def __init__(self, label_names: list[str], mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__(label_names)
        self.mean, self.std = float(mean), float(std)

    @property
    def num_outputs(self) -> int:
        return 1

    def value(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.squeeze(-1) * self.std + self.mean

    def training_loss(self, cfg, stats):
        return losses.RegressionLoss(cfg, self.mean, self.std)

    def eval_rows(self, outputs, targets):
        value = self.value(outputs)
        return {"loss": (value - targets).square().cpu(), "target": targets.cpu(), "prediction": value.cpu()}

    def scores(self, rows):
        target, prediction = rows["target"].astype(np.float64), rows["prediction"].astype(np.float64)
        r2 = skm.r2_score(target, prediction) if len(target) > 1 else 0.0
        return {"mae": float(skm.mean_absolute_error(target, prediction)),
                "rmse": float(skm.root_mean_squared_error(target, prediction)), "r2": float(r2)}  # fmt: skip

    def constant_rows(self, rows):
        """The split's mean target for every row (R^2 = 0)."""
        return {**rows, "prediction": np.full_like(rows["prediction"], rows["target"].astype(np.float64).mean())}

    def predict(self, outputs):
        return [{"value": float(v)} for v in self.value(outputs.float())]

    def to_json(self):
        return {"type": self.type, "mean": self.mean, "std": self.std}


def build_task(cfg: TaskConfig, label_names: list[str], stats: dict | None = None) -> Task:
    """The task of a pipeline; `stats` (the training split's label sums) give a regression target's
    mean and std. A per-label setting of the wrong length is a ConfigError."""
    if cfg.type == "multi_label":
        return MultiLabel(label_names, cfg.threshold)
    if cfg.type == "regression":
        if not (cfg.normalize_targets and stats and stats["rows"]):
            return Regression(label_names)
        mean = stats["sums"][0] / stats["rows"]
        variance = max(stats["squares"] / stats["rows"] - mean**2, 0.0)
        return Regression(label_names, mean, math.sqrt(variance) or 1.0)  # a constant target: no scaling
    return Classification(label_names)


def task_from_json(state: dict, label_names: list[str]) -> Task:
    """A saved model's task (task.json); a model saved before task types is a classifier."""
    if state["type"] == "multi_label":
        return MultiLabel(label_names, state["thresholds"])
    if state["type"] == "regression":
        return Regression(label_names, state["mean"], state["std"])
    return Classification(label_names)


def needs_label_stats(cfg: TaskConfig, loss: LossConfig) -> bool:
    """Whether the training split's labels must be counted first (one pass over the label column)."""
    return loss.class_weights == "balanced" or (cfg.type == "regression" and cfg.normalize_targets)
