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

from finetune.config.base import ConfigError, MetricName, Section, lower_is_better, metric_mode, task_class  # noqa: F401
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


def load_saved(path: str | Path) -> PipelineConfig:
    """A config this tool wrote (a run's config.yaml, a sweep's): checked when its run started,
    read back against the schema alone, without touching data or models (`finetune predict`
    needs neither). A user's pipeline file goes through `finetune.checks.load_pipeline`, the
    one loader for those."""
    return parse(read_raw(path))


def save(config: PipelineConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    files.write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
