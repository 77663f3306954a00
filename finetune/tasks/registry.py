"""The task types by name (`task.type`), filled by `@register_task` as finetune/tasks/ imports
each task's module."""

from __future__ import annotations

from finetune.tasks.base import Task

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.type] = cls
    return cls
