"""multi_label: any number of labels per row, a sigmoid per label, predicted at or above its threshold."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from finetune.config import ConfigError
from finetune.tasks import losses
from finetune.tasks.base import Task, mixing_problem, text_or_integer
from finetune.tasks.registry import register_task


def label_set(value, delimiter: str) -> list[str]:
    """A multi-label cell as label names: a list as it is, a string split on the delimiter."""
    items = value.split(delimiter) if isinstance(value, str) else list(value)
    return [text for text in (str(item.item() if isinstance(item, np.generic) else item).strip() for item in items)
            if text]  # fmt: skip


@register_task
class MultiLabel(Task):
    type = "multi_label"
    hf_problem_type = "multi_label_classification"
    metric_names = ("micro_f1", "macro_f1", "map", "loss")
    # F1 at the thresholds, what `predict` delivers. mAP only ranks scores: a barely trained model
    # whose near-0.5 scores happen to rank well has a high mAP and predicts nothing useful.
    default_metric = "val/micro_f1"
    loss_names = ("bce", "focal")
    constant_predictor = "predicting every label for every row"

    def __init__(self, label_names: list[str], threshold: float | list[float]) -> None:
        super().__init__(label_names)
        thresholds = threshold if isinstance(threshold, list) else [threshold] * len(label_names)
        if len(thresholds) != len(label_names):
            raise ConfigError([f"task.threshold has {len(thresholds)} values; the data has {len(label_names)} "
                               f"labels ({', '.join(label_names)})"])  # fmt: skip
        self.thresholds = [float(t) for t in thresholds]

    @classmethod
    def config_problems(cls, cfg):
        problems = mixing_problem(cfg, cls.type)
        if cfg.loss.name == "focal" and cfg.loss.alpha is not None:
            if isinstance(cfg.loss.alpha, list) or not 0.0 < cfg.loss.alpha < 1.0:
                problems.append("loss.alpha: multi_label focal takes one number in (0, 1), the weight of positives")
        if cfg.loss.name == "focal" and cfg.loss.class_weights is not None:
            problems.append("loss.class_weights: multi_label focal weighs positives with loss.alpha")
        return problems

    @classmethod
    def from_config(cls, cfg, label_names, stats):
        return cls(label_names, cfg.threshold)

    @classmethod
    def from_json(cls, state, label_names):
        return cls(label_names, state["thresholds"])

    def to_json(self):
        return {"type": self.type, "thresholds": self.thresholds}

    @classmethod
    def label_type_problem(cls, label_type):
        if pa.types.is_list(label_type) or pa.types.is_large_list(label_type):
            return None if text_or_integer(label_type.value_type) else "multi-label lists hold label names or ids"
        return None if text_or_integer(label_type) else "multi-label labels are a list or a delimited string"

    @classmethod
    def is_empty(cls, value) -> bool:
        """An empty list or string is a label too: none applies."""
        return not isinstance(value, str) and super().is_empty(value)

    @classmethod
    def names_in(cls, values, delimiter):
        return [name for value in values for name in label_set(value, delimiter)]

    @classmethod
    def encode(cls, values, label_names, delimiter, check_known):
        index = {name: i for i, name in enumerate(label_names)}
        multi_hot = np.zeros((len(values), len(label_names)), dtype=np.float32)
        for row, value in enumerate(values):
            names = label_set(value, delimiter)
            check_known(names)
            multi_hot[row, [index[name] for name in names]] = 1.0
        return multi_hot

    @classmethod
    def label_sums(cls, labels, outputs):
        return labels.reshape(-1, outputs).sum(axis=0), 0.0

    def training_loss(self, cfg, stats):
        positives, rows = (stats["sums"], stats["rows"]) if stats else (None, 0)
        return losses.MultiLabelLoss(cfg, losses.positive_weights(cfg, self.label_names, positives, rows))

    def eval_rows(self, outputs, targets):
        loss = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=-1)
        return {"loss": loss.cpu(), "target": targets.to(torch.uint8).cpu(), "probability": torch.sigmoid(outputs).cpu()}

    def scores(self, rows):
        from sklearn import metrics as skm

        target, probability = rows["target"], rows["probability"]
        predicted = self.predicted(probability)
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

    def predicted(self, probability: np.ndarray) -> np.ndarray:
        """0/1 per label: at or above its threshold."""
        return (probability >= np.asarray(self.thresholds, dtype=np.float32)).astype(np.uint8)

    mistakes_title = "The most confident mistakes (a label missed or given)"

    def mistake_order(self, rows):
        target, probability = rows["target"].astype(np.float32), rows["probability"]
        wrong = self.predicted(probability) != target
        # how far the worst wrong label's probability is from its truth (1 for a sure miss)
        badness = np.where(wrong, np.abs(probability - target), 0.0).max(axis=-1, initial=0.0)
        return np.where(wrong.any(axis=-1), badness, np.nan)

    def row_in_words(self, row):
        probability = row["probability"]
        given = self.predicted(probability)
        return {"true": ", ".join(n for n, t in zip(self.label_names, row["target"]) if t) or "(no label)",
                "predicted": ", ".join(f"{n} {p:.2f}" for n, p, g in zip(self.label_names, probability, given) if g)
                or "(no label)",
                "score": "missed: " + (", ".join(f"{n} {p:.2f}" for n, p, g, t in
                                                 zip(self.label_names, probability, given, row["target"]) if t and not g)
                                       or "none")}  # fmt: skip

    def predict(self, outputs):
        results = []
        for row in torch.sigmoid(outputs.float()):
            results.append({"labels": [name for name, p, t in zip(self.label_names, row.tolist(), self.thresholds) if p >= t],
                            "probabilities": dict(zip(self.label_names, row.tolist()))})  # fmt: skip
        return results

    @staticmethod
    def prediction_text(prediction: dict) -> str:
        """The labels at or above their thresholds, each with its probability."""
        return ", ".join(f"{name} {prediction['probabilities'][name]:.3f}" for name in prediction["labels"]) or "(no label)"
