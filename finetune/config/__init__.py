"""One typed schema for a pipeline file, YAML loading and `a.b=c` overrides.

A pipeline is validated here, before Ray starts: a wrong key, type or value raises one
`ConfigError` listing every problem with its dotted key and what is allowed.

  base.py       Section, ConfigError, metric names and direction
  schema.py     the sections and PipelineConfig (strategy sections: finetune/strategies/)
  overrides.py  the file as a mapping, overrides applied
  errors.py     validation errors as dotted-key lines
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune import files

from finetune.config.base import (  # noqa: F401
    ConfigError, MetricName, Section, judged_metric, lower_is_better, metric_mode, task_class,
)  # fmt: skip
from finetune.config.errors import describe_errors, unknown_key_hints
from finetune.config.overrides import apply_overrides, read_raw, set_dotted  # noqa: F401
from finetune.config.schema import *  # noqa: F403 - the sections, as `from finetune.config import DataConfig`
from finetune.config.schema import PipelineConfig


def parse(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a raw mapping into a `PipelineConfig`, or raise `ConfigError` with every problem."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        hints = unknown_key_hints(raw)
        problems = [
            f"{line} (allowed: {hints[line.split(':')[0]]})" if line.split(":")[0] in hints else line
            for line in describe_errors(error)
        ]
        raise ConfigError(problems) from None


# keys that may hold a path relative to where the command runs
PATH_KEYS = (("data", "source"), ("data", "val_source"), ("data", "test_source"), ("model", "name"),
             ("model", "weights"), ("checkpoint", "storage_path"))  # fmt: skip


def with_absolute_paths(raw: dict[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """A copy of `raw` whose relative paths are absolute, taken from `root` (default: the working
    directory): inputs that exist there, and checkpoint.storage_path (an output). For the
    processes that run a sweep's or a race's trials, which do not run where the command did.
    Names (minilm-l6, rotten_tomatoes), hub ids and URIs stay."""
    import copy

    root = Path(root or Path.cwd())
    out = copy.deepcopy(raw)
    for section, key in PATH_KEYS:
        value = (out.get(section) or {}).get(key)
        if not isinstance(value, str) or "://" in value:
            continue
        prefix, path = ("hf:", value[3:]) if value.startswith("hf:") else ("", value)
        path = Path(path).expanduser()
        if not path.is_absolute() and ((root / path).exists() or key == "storage_path"):
            out[section][key] = prefix + str((root / path).resolve())
    return out


def load_saved(path: str | Path) -> PipelineConfig:
    """A config this tool wrote (a run's config.yaml, a sweep's): checked when its run started,
    read back against the schema alone, without touching data or models (`finetune predict`
    needs neither). A user's pipeline file goes through `finetune.checks.load_pipeline`, the
    one loader for those."""
    return parse(read_raw(path))


def save(config: PipelineConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    files.write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
