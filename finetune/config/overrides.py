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


class _PipelineLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the
    last, so a forgotten earlier setting would silently lose)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in this mapping (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = ": ".join(part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
    return f"{path}{where}: not valid YAML ({what or error})"


def read_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The pipeline file as a mapping, overrides applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"pipeline file {path} does not exist"])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: byte {error.start} (0x{data[error.start]:02x}) is not UTF-8 text; save the "
                           "pipeline file as UTF-8"]) from None  # fmt: skip
    try:
        raw = yaml.load(text, Loader=_PipelineLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError([_yaml_problem(path, error)]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: a pipeline file is a mapping of sections (data, model, train, ...)"])
    return apply_overrides(raw, overrides or [])
