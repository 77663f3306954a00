"""classification: one class per row, softmax over the classes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from finetune.tasks import losses
from finetune.tasks.base import Task, per_label_threshold_problem, text_or_integer
from finetune.tasks.registry import register_task


@register_task
class Classification(Task):
    type = "classification"
    hf_problem_type = "single_label_classification"
    metric_names = ("accuracy", "macro_f1", "loss")
    default_metric = "val/accuracy"
    loss_names = ("cross_entropy", "focal")
    labels_from_class_folders = True
    constant_predictor = "always predicting the most common class"

    @classmethod
    def config_problems(cls, cfg):
        problems = per_label_threshold_problem(cfg, cls.type)
        if cfg.loss.name == "focal" and cfg.loss.alpha is not None and not isinstance(cfg.loss.alpha, list):
            problems.append("loss.alpha: classification focal takes one weight per class, in label order")
        return problems

    @classmethod
    def label_type_problem(cls, label_type: pa.DataType) -> str | None:
        if text_or_integer(label_type) or pa.types.is_boolean(label_type):
            return None
        return "classification labels are class names or integer class ids"

    @classmethod
    def label_names_problem(cls, names):
        if len(names) < 2:
            return f"every row has the label {names[0]!r}: a classifier needs rows of at least two classes"
        return None

    @classmethod
    def encode(cls, values, label_names, delimiter, check_known):
        index = {name: i for i, name in enumerate(label_names)}
        names = [str(v) for v in values]
        check_known(names)
        return np.array([index[name] for name in names], dtype=np.int64)

    @classmethod
    def label_sums(cls, labels, outputs):
        return np.bincount(labels, minlength=outputs), 0.0

    def training_loss(self, cfg, stats) -> nn.Module:
        counts = dict(zip(self.label_names, stats["sums"])) if stats else None
        return losses.build_loss(cfg, self.label_names, counts)

    def eval_rows(self, outputs, targets):
        confidence, prediction = torch.softmax(outputs, dim=-1).max(dim=-1)
        return {"loss": F.cross_entropy(outputs, targets, reduction="none").cpu(),
                "target": targets.cpu(), "prediction": prediction.cpu(), "confidence": confidence.cpu()}  # fmt: skip

    def scores(self, rows):
        from sklearn.metrics import f1_score

        target, prediction = rows["target"], rows["prediction"]
        # macro-F1 over the classes in labels or predictions (scikit-learn's default label set)
        return {"accuracy": float((target == prediction).mean()),
                "macro_f1": float(f1_score(target, prediction, average="macro", zero_division=0))}  # fmt: skip

    def constant_rows(self, rows):
        """Every row predicted as the split's most common class."""
        return {**rows, "prediction": np.full_like(rows["prediction"], np.bincount(rows["target"]).argmax())}

    def mistake_order(self, rows):
        return np.where(rows["prediction"] != rows["target"], rows["confidence"], np.nan)

    def row_in_words(self, row):
        return {"true": self.label_names[int(row["target"])], "predicted": self.label_names[int(row["prediction"])],
                "score": f"confidence {float(row['confidence']):.2f}"}  # fmt: skip

    def predict(self, outputs):
        results = []
        for row in torch.softmax(outputs.float(), dim=-1):
            best = int(row.argmax())
            results.append({"label": self.label_names[best], "probability": float(row[best]),
                            "probabilities": dict(zip(self.label_names, row.tolist()))})  # fmt: skip
        return results

    @staticmethod
    def prediction_text(prediction: dict) -> str:
        return f"{prediction['label']}\t{prediction['probability']:.3f}"
