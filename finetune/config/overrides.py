"""The pipeline file as a mapping: YAML read, `a.b=c` overrides set (values parsed as YAML
scalars), not yet validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune.config.base import ConfigError


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> str | None:
    """Set `raw[a][b] = value` for key `a.b`, creating sections; the problem, if any."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"{'.'.join(parts[: depth + 1])} is a value, not a section"
        node = child
    node[parts[-1]] = value
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b=c` overrides in a raw YAML mapping; values are parsed as YAML scalars."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.sub=value")
            continue
        problem = set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)
        if problem:
            problems.append(f"override {item!r}: {problem}")
    if problems:
        raise ConfigError(problems)
    return raw


def read_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The pipeline file as a mapping, overrides applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"pipeline file {path} does not exist"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError([f"{path} is not valid YAML: {error}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: a pipeline file is a mapping of sections (data, model, train, ...)"])
    return apply_overrides(raw, overrides or [])
