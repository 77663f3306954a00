"""What a task type decides, in one class per type: how its labels are typed and encoded (the
data layer asks), its head width and training loss, its per-row evaluation and metrics, what a
predictor that ignores its input scores, what a prediction says, and what is saved with the
model. Plain PyTorch, NumPy and scikit-learn (no Ray): it runs the same in a Ray Data task, a
worker, `finetune evaluate` and a bare benchmark.

A new task type is one module with one `Task` subclass, registered with `@register_task` and
imported in `finetune/tasks/__init__.py`.

Evaluation keeps per-row results (`eval_rows`), which DDP ranks gather before `metrics`: mAP
needs every score of a label at once, and one path for all tasks keeps them comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

if TYPE_CHECKING:
    from finetune.config import LossConfig, PipelineConfig, TaskConfig


class Task:
    type: ClassVar[str] = ""
    metric_names: ClassVar[tuple[str, ...]] = ()  # reported every epoch (val/<name>) and on test
    # what checkpoint.metric (and so a sweep's metric) is when unset
    default_metric: ClassVar[str] = ""
    loss_names: ClassVar[tuple[str, ...]] = ()  # loss.name values; the first is the default
    labels_from_class_folders: ClassVar[bool] = False  # image folders and the builtin datasets label by class
    constant_predictor: ClassVar[str] = ""  # what `constant_rows` predicts, in words (the verdict quotes it)

    def __init__(self, label_names: list[str]) -> None:
        self.label_names = list(label_names)

    # ---- the pipeline ----------------------------------------------------------------------------

    @classmethod
    def config_problems(cls, cfg: PipelineConfig) -> list[str]:
        """Settings of other sections this task cannot honour (one line each)."""
        return []

    @classmethod
    def from_config(cls, cfg: TaskConfig, label_names: list[str], stats: dict | None) -> "Task":
        """The task of a pipeline; `stats`: the training split's label sums (`label_sums`), when
        `needs_label_stats` says so."""
        return cls(label_names)

    @classmethod
    def needs_label_stats(cls, cfg: TaskConfig) -> bool:
        """Whether the training split's labels must be counted before training (beyond balanced class weights)."""
        return False

    @classmethod
    def from_json(cls, state: dict, label_names: list[str]) -> "Task":
        """A saved model's task (task.json)."""
        return cls(label_names)

    def to_json(self) -> dict:
        return {"type": self.type}

    # ---- labels in the data ----------------------------------------------------------------------

    @classmethod
    def label_type_problem(cls, label_type: pa.DataType) -> str | None:
        """Why a label column of this Arrow type cannot hold this task's labels (None: it can)."""
        raise NotImplementedError

    @classmethod
    def is_empty(cls, value) -> bool:
        """A missing label: a bad row."""
        if isinstance(value, str):
            return not value.strip()
        if isinstance(value, (list, tuple, np.ndarray)):
            return False
        return value is None or bool(pd.isna(value))  # None, NaN, pandas' NA

    @classmethod
    def label_problem(cls, value) -> str | None:
        """Why a label cell makes its row a bad row (None: the row can be used)."""
        return "empty label" if cls.is_empty(value) else None

    @classmethod
    def label_names_problem(cls, names: list[str]) -> str | None:
        """Why the labels the training data has cannot train this task (None: they can)."""
        return None

    @classmethod
    def fixed_label_names(cls, label_column: str) -> list[str] | None:
        """The label names when they do not come from the data (None: discovered in the training split)."""
        return None

    @classmethod
    def names_in(cls, values: list, delimiter: str) -> list:
        """The label names a batch of (non-empty) label cells mentions."""
        return values

    @classmethod
    def encode(cls, values: np.ndarray, label_names: list[str], delimiter: str, check_known) -> np.ndarray:
        """A batch of label cells as the model's targets; `check_known(names)` raises for a label the
        training split does not have."""
        raise NotImplementedError

    @classmethod
    def label_sums(cls, labels: np.ndarray, outputs: int) -> tuple[np.ndarray, float]:
        """Per-output sums of encoded labels (class counts, positives per label, the target's sum)
        and the sum of squares (regression)."""
        raise NotImplementedError

    # ---- the model -----------------------------------------------------------------------------

    # what Hugging Face's config.json calls this task (its pipelines pick softmax, sigmoid or none by it)
    hf_problem_type: ClassVar[str] = ""

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def output_scaling(self) -> tuple[float, float] | None:
        """(scale, shift) that turn the head's outputs into the task's own units, which a saved
        model folds into its last layer so other tools read its outputs as they are (None: none)."""
        return None

    def with_outputs_in_units(self) -> "Task":
        """This task for a model whose outputs `output_scaling` has already been folded into."""
        return self

    def training_loss(self, cfg: LossConfig, stats: dict | None) -> nn.Module:
        raise NotImplementedError

    def eval_rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row results on the CPU; `loss` is the task's plain loss (comparable across loss settings)."""
        raise NotImplementedError

    def scores(self, rows: dict[str, np.ndarray]) -> dict[str, float]:
        raise NotImplementedError

    def constant_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`rows` with the outputs of the best model that ignores its input (see subclasses)."""
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> list[dict]:
        raise NotImplementedError

    @staticmethod
    def prediction_text(prediction: dict) -> str:
        """One prediction as a terminal column (`finetune predict`)."""
        raise NotImplementedError

    # ---- the report -------------------------------------------------------------------------------

    mistakes_title: ClassVar[str] = "The most confident mistakes"

    def mistake_order(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """How bad each row's mistake is, worst highest; NaN for a row the model got right. The
        report shows the worst test rows with the inputs the model saw."""
        raise NotImplementedError

    def row_in_words(self, row: dict[str, np.ndarray]) -> dict[str, str]:
        """One evaluated row as the report prints it: {"true", "predicted", "score"}."""
        raise NotImplementedError

    def metrics(self, rows: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        """`{prefix}/<metric>` for every metric of the task, plus the row count."""
        count = len(rows["loss"])
        if count == 0:
            values = dict.fromkeys(self.metric_names, 0.0)
        else:
            values = {"loss": float(rows["loss"].double().mean()),
                      **self.scores({k: v.numpy() for k, v in rows.items()})}  # fmt: skip
        return {**{f"{prefix}/{name}": values[name] for name in self.metric_names}, f"{prefix}/samples": count}

    def constant_metrics(self, rows: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        """`constant_{prefix}/<metric>`: what a predictor that ignores its input scores on these rows
        (the yardstick a model that learned nothing reaches); no loss."""
        if len(rows["loss"]) == 0:
            return {}
        scores = self.scores(self.constant_rows({k: v.numpy() for k, v in rows.items()}))
        return {f"constant_{prefix}/{name}": value for name, value in scores.items()}


def text_or_integer(label_type: pa.DataType) -> bool:
    t = label_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or pa.types.is_null(t)


def mixing_problem(cfg: PipelineConfig, task: str) -> list[str]:
    if cfg.data.mixup_alpha or cfg.data.cutmix_alpha:
        return [f"data.mixup_alpha / data.cutmix_alpha: mix class labels; not for a {task} task"]
    return []


def per_label_threshold_problem(cfg: PipelineConfig, task: str) -> list[str]:
    if isinstance(cfg.task.threshold, list):
        return [f"task.threshold: per-label thresholds are for multi_label, not {task}"]
    return []
