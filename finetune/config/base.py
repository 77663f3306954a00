"""What every config section shares: the section base class, the error a pipeline that cannot
run raises, validation-metric names and their direction. Imports nothing else from `finetune`
at import time (a task's metrics are asked of finetune/tasks/ when a pipeline is checked), so
a strategy's module can define its config section beside its code."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigError(ValueError):
    """A pipeline that cannot run; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Section(BaseModel):
    # Unknown keys are mistakes (a typo would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- validation metrics: which ones a task reports is the task's (finetune/tasks/)


def _validation_metric(value: str) -> str:
    if not re.fullmatch(r"val/[a-z0-9_]+", value):
        raise ValueError(f"{value!r}: a validation metric is named val/<metric>, e.g. val/accuracy")
    return value


MetricName = Annotated[str, AfterValidator(_validation_metric)]


def _home_expanded(value: str) -> str:
    """`~/data/x.csv` as the shell would read it: Ray, pyarrow and the hub loaders take `~` literally.
    A URI with a password in it is refused: saved configs and logs would repeat it."""
    if "://" in value and urlsplit(value).password:
        raise ValueError("a URI with credentials in it would be written to the run's config.yaml and logs; give "
                         "them through the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a profile")
    prefix, sep, rest = value.partition(":") if value.startswith("hf:") else ("", "", value)
    return prefix + sep + (os.path.expanduser(rest) if rest.startswith("~") else rest)


# a path (or a URI, left as it is) where `~` means the home directory, as in a shell
UserPath = Annotated[str, AfterValidator(_home_expanded)]


def task_class(name: str):
    """The task type's class (finetune.tasks), imported when a pipeline is checked: the schema
    stays importable without torch."""
    from finetune.tasks import task_class

    return task_class(name)


def lower_is_better(metric: str) -> bool:
    """Losses and errors fall as a model improves; accuracy, F1, mAP and R^2 rise."""
    return metric.rsplit("/", 1)[-1] in ("loss", "mae", "rmse")


def judged_metric(task: str, checkpoint_metric: str) -> str:
    """The metric a run is judged by (verdict, yardstick): the checkpoint metric's name, the task's
    first metric when that is the loss."""
    name = checkpoint_metric.split("/", 1)[1]
    return task_class(task).metric_names[0] if name == "loss" else name


def metric_mode(metric: str) -> Literal["min", "max"]:
    return "min" if lower_is_better(metric) else "max"


def regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as error:
        return str(error)
    return None
