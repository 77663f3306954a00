"""regression: a numeric target, one output, trained on the standardised target (mean, std of
the training split), reported and predicted in the target's own units."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from finetune.tasks import losses
from finetune.tasks.base import Task, mixing_problem, per_label_threshold_problem
from finetune.tasks.registry import register_task


@register_task
class Regression(Task):
    type = "regression"
    hf_problem_type = "regression"
    metric_names = ("mae", "rmse", "r2", "loss")
    default_metric = "val/rmse"
    loss_names = ("mse", "huber")
    constant_predictor = "always predicting the mean"

    def __init__(self, label_names: list[str], mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__(label_names)
        self.mean, self.std = float(mean), float(std)

    @classmethod
    def config_problems(cls, cfg):
        problems = mixing_problem(cfg, cls.type) + per_label_threshold_problem(cfg, cls.type)
        if cfg.loss.label_smoothing or cfg.loss.class_weights is not None:
            problems.append("loss.label_smoothing / loss.class_weights: a regression target has no classes")
        return problems

    @classmethod
    def needs_label_stats(cls, cfg):
        return cfg.normalize_targets

    @classmethod
    def from_config(cls, cfg, label_names, stats):
        if not (cfg.normalize_targets and stats and stats["rows"]):
            return cls(label_names)
        mean = stats["sums"][0] / stats["rows"]
        variance = max(stats["squares"] / stats["rows"] - mean**2, 0.0)
        return cls(label_names, mean, math.sqrt(variance) or 1.0)  # a constant target: no scaling

    @classmethod
    def from_json(cls, state, label_names):
        return cls(label_names, state["mean"], state["std"])

    def to_json(self):
        return {"type": self.type, "mean": self.mean, "std": self.std}

    @classmethod
    def label_type_problem(cls, label_type):
        numeric = pa.types.is_integer(label_type) or pa.types.is_floating(label_type) or pa.types.is_null(label_type)
        return None if numeric else "regression targets are numbers"

    @classmethod
    def label_problem(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return "empty label"
        number = float(value)
        if math.isnan(number):  # an empty numeric cell reads as NaN
            return "no target (an empty cell or NaN)"
        return None if math.isfinite(number) else f"target {value} is not a finite number"

    @classmethod
    def fixed_label_names(cls, label_column):
        return [label_column]  # the one output is the target column

    @classmethod
    def encode(cls, values, label_names, delimiter, check_known):
        return np.asarray(values, dtype=np.float32)

    @classmethod
    def label_sums(cls, labels, outputs):
        return np.array([labels.sum(dtype=np.float64)]), float(np.square(labels, dtype=np.float64).sum())

    @property
    def num_outputs(self) -> int:
        return 1

    def output_scaling(self):
        return (self.std, self.mean) if (self.std, self.mean) != (1.0, 0.0) else None

    def with_outputs_in_units(self):
        return Regression(self.label_names)

    def value(self, outputs):
        return outputs.squeeze(-1) * self.std + self.mean

    def training_loss(self, cfg, stats):
        return losses.RegressionLoss(cfg, self.mean, self.std)

    def eval_rows(self, outputs, targets):
        value = self.value(outputs)
        return {"loss": (value - targets).square().cpu(), "target": targets.cpu(), "prediction": value.cpu()}

    def scores(self, rows):
        from sklearn import metrics as skm

        target, prediction = rows["target"].astype(np.float64), rows["prediction"].astype(np.float64)
        r2 = skm.r2_score(target, prediction) if len(target) > 1 else 0.0
        return {"mae": float(skm.mean_absolute_error(target, prediction)),
                "rmse": float(skm.root_mean_squared_error(target, prediction)), "r2": float(r2)}  # fmt: skip

    def constant_rows(self, rows):
        """The split's mean target for every row (R^2 = 0)."""
        return {**rows, "prediction": np.full_like(rows["prediction"], rows["target"].astype(np.float64).mean())}

    mistakes_title = "The largest errors"

    def mistake_order(self, rows):
        return np.abs(rows["prediction"].astype(np.float64) - rows["target"])

    def row_in_words(self, row):
        target, prediction = float(row["target"]), float(row["prediction"])
        return {"true": f"{target:.4g}", "predicted": f"{prediction:.4g}", "score": f"error {prediction - target:+.3g}"}

    def predict(self, outputs):
        return [{"value": float(v)} for v in self.value(outputs.float())]

    @staticmethod
    def prediction_text(prediction: dict) -> str:
        return f"{prediction['value']:.6g}"
