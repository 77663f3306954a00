"""Loads a pipeline and checks it against the registries and the file system, before Ray starts.

Every problem is reported at once: schema mistakes and, for each section that parses on
its own, registry mistakes (an unknown model, a missing data file).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from finetune import config as config_module
from finetune.config import ConfigError, DataConfig, ModelConfig, PipelineConfig
from finetune.data import check_source
from finetune.models import check_model

SECTION_CHECKS = (("data", DataConfig, check_source), ("model", ModelConfig, check_model))


def _registry_problems(raw: dict) -> list[str]:
    problems = []
    for key, schema, check in SECTION_CHECKS:
        try:
            section = schema.model_validate(raw.get(key))
        except ValidationError:
            continue  # the schema error already names this section
        problems += check(section)
    return problems


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """A validated pipeline, or one ConfigError listing every problem found."""
    raw = config_module.read_raw(path, overrides)
    try:
        cfg = config_module.parse(raw)
    except ConfigError as error:
        raise ConfigError(error.problems + _registry_problems(raw)) from None
    problems = _registry_problems(raw)
    if problems:
        raise ConfigError(problems)
    return cfg
