"""Task types: one module per type, each a registered `Task` subclass (see tasks/base.py).

To add one: write its module, decorate the class with `@register_task`, import it below.
"""

from __future__ import annotations

from finetune.tasks import classification, multi_label, regression  # noqa: F401 - registers them
from finetune.tasks.base import Task
from finetune.tasks.registry import TASKS


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task type {name!r}: known task types are {', '.join(TASKS)}") from None


def build_task(cfg, label_names: list[str], stats: dict | None = None) -> Task:
    """The task of a pipeline (`cfg`: its TaskConfig); `stats` (the training split's label sums)
    give e.g. a regression target's mean and std. A per-label setting of the wrong length is a ConfigError."""
    return task_class(cfg.type).from_config(cfg, label_names, stats)


def task_from_json(state: dict, label_names: list[str]) -> Task:
    """A saved model's task (task.json)."""
    return task_class(state["type"]).from_json(state, label_names)


def needs_label_stats(cfg, loss) -> bool:
    """Whether the training split's labels must be counted first (one pass over the label column)."""
    return loss.class_weights == "balanced" or task_class(cfg.type).needs_label_stats(cfg)


__all__ = ["TASKS", "Task", "build_task", "needs_label_stats", "task_class", "task_from_json"]
