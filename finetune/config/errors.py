"""pydantic's validation errors as the lines a user reads: dotted keys (without the union
member pydantic names), one line per problem, and for an unknown key the keys its section allows."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from finetune.config.schema import STRATEGY_CONFIGS, AugmentConfig, PipelineConfig, SchedulerConfig


def _tagged(union) -> dict[str, type[BaseModel]]:
    return {cls.model_fields["name"].annotation.__args__[0]: cls for cls in union.__origin__.__args__}


AUGMENT_CLASSES = _tagged(AugmentConfig)
SCHEDULER_CLASSES = _tagged(SchedulerConfig)


def _dotted_key(loc: tuple) -> str:
    # pydantic names the union member in the path (strategy.partial.freeze_groups): drop it.
    parts = [
        str(p) for i, p in enumerate(loc)
        if not (i == 1 and loc[0] == "strategy" and p in STRATEGY_CONFIGS)
        and not (i == 3 and loc[1] == "augment" and p in AUGMENT_CLASSES)
        and not (i == 2 and loc[1] == "scheduler" and p in SCHEDULER_CLASSES)
    ]  # fmt: skip
    return ".".join(parts)


def describe_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = _dotted_key(item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        elif item["type"] == "missing":
            problems.append(f"{key}: required, not set")
        elif item["type"] == "value_error":
            message = str(item["ctx"]["error"]) if "ctx" in item else item["msg"]
            # a cross-section check reports each of its problems on a line of its own
            problems += [f"{key}: {line}" if key else line for line in message.split("\n")]
        else:
            problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return problems


def unknown_key_hints(raw: dict[str, Any]) -> dict[str, str]:
    """For each unknown key, the keys its section does allow."""
    hints: dict[str, str] = {}

    def walk(model: type[BaseModel], node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            path = f"{prefix}{key}"
            field = model.model_fields.get(key)
            if field is None:
                hints[path] = ", ".join(model.model_fields)
                continue
            annotation = field.annotation
            if key == "strategy" and isinstance(value, dict):
                annotation = STRATEGY_CONFIGS.get(value.get("name", "full"))
            if get_origin(annotation) in (Union, UnionType):  # an optional section: X | None
                annotation = next((a for a in get_args(annotation) if a is not type(None)), None)
            if get_origin(annotation) is dict and isinstance(value, dict):  # e.g. tune.search_space
                item = get_args(annotation)[1]
                for name, entry in value.items():
                    walk(item, entry, f"{path}.{name}.")
            elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, value, path + ".")

    walk(PipelineConfig, raw, "")
    return hints
