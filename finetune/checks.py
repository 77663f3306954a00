"""Loads a pipeline and checks it against the registries and the file system, before Ray starts.

Every problem is reported at once: schema mistakes and, for each section that parses on
its own, registry mistakes (an unknown model, a missing data file).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import ValidationError

from finetune import config as config_module
from finetune import models
from finetune.config import STRATEGY_CONFIGS, ConfigError, DataConfig, ModelConfig, PipelineConfig, task_class
from finetune.data.catalog import CATALOG
from finetune.data.sources import check_source
from finetune.models import check_model
from finetune.models.groups import layer_groups
from finetune.tracking import check_tracking
from finetune.training.setup import Training, build_training
from finetune.strategies.auto import modality, pipeline_lr, plan_race
from finetune.tuning.space import check_search_alg, check_search_space

SECTION_CHECKS = (("data", DataConfig, check_source), ("model", ModelConfig, check_model))


def check_task(cfg: PipelineConfig) -> list[str]:
    """A builtin dataset is a classification dataset."""
    if not task_class(cfg.task.type).labels_from_class_folders and cfg.data.source in CATALOG:
        return [f"data.source={cfg.data.source} is a classification dataset; task.type={cfg.task.type} needs a "
                "file with that kind of label (data.label_column)"]  # fmt: skip
    return []


def check_splits(cfg: PipelineConfig) -> list[str]:
    """A run needs validation rows (to choose its checkpoint) and test rows (to report on)."""
    problems = []
    for split, use in (("val", "choose the best checkpoint on"), ("test", "report the final scores on")):
        if not getattr(cfg.data, f"{split}_fraction") and not getattr(cfg.data, f"{split}_source"):
            problems.append(f"data.{split}_fraction=0 and no data.{split}_source: there would be no {split} rows to "
                            f"{use}; set data.{split}_fraction above 0 or give data.{split}_source")  # fmt: skip
    return problems


def check_text_length(cfg: PipelineConfig) -> list[str]:
    """data.max_length beyond the text model's positions would fail in the first forward pass."""
    positions = models.text_positions(cfg.model)
    if positions and cfg.data.max_length > positions:
        return [f"data.max_length={cfg.data.max_length}: {cfg.model.name} has {positions} token positions; "
                f"set data.max_length to {positions} or less (longer texts are truncated)"]  # fmt: skip
    return []


def check_augmentation(cfg: PipelineConfig) -> list[str]:
    """Image augmentation set for a text model."""
    if models.resolve(cfg.model.name).family != "hf":
        return []
    used = [key for key in ("augment", "mixup_alpha", "cutmix_alpha") if getattr(cfg.data, key)]
    return [f"data.{key} augments images; model.name={cfg.model.name} takes text" for key in used]


def check_compile(cfg: PipelineConfig) -> list[str]:
    """torch.compile builds its kernels with a C++ compiler (Triton's launchers too): without one the
    run would fail at its first step, inside a worker."""
    if cfg.train.compile and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return ["train.compile=true needs a C++ compiler where the workers run (none found here): install one "
                "(apt-get install g++) or set train.compile=false"]  # fmt: skip
    return []


def meta_training(cfg: PipelineConfig) -> Training | None:
    """The training setup chain (training.setup.build_training, as the workers run it) over the
    model's structure on the meta device: no weights, no memory. None when the architecture is
    out of reach from here (a hub model offline): the workers will say what is wrong."""
    if cfg.strategy.name == "auto":
        return None  # the race builds each candidate's (check_auto checks them)
    model = models.meta_architecture(cfg.model, models.image_size_for(cfg.data))
    return None if model is None else build_training(cfg, model, steps_per_epoch=1)


def race_plan(cfg: PipelineConfig, full_lr: float | None, steps_per_epoch: int = 1):
    """strategy.name=auto: the race's plan (strategies.auto.plan_race) for this model and budget,
    rates relative to `full_lr` (the pipeline file's optim.lr: None when it sets none). The step
    count only sets gradual unfreezing's and LP-FT's periods; the driver passes the real one."""
    model = models.meta_architecture(cfg.model, models.image_size_for(cfg.data))
    groups = len(layer_groups(model, cfg.model.layer_groups)) if model is not None else 8
    kind = modality(models.resolve(cfg.model.name).family)
    return plan_race(cfg.strategy, kind, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, groups=groups,
                     full_lr=full_lr)  # fmt: skip


def candidate_config(cfg: PipelineConfig, strategy: dict, lr: float) -> PipelineConfig:
    """The pipeline with a race candidate's strategy section and learning rate."""
    section = STRATEGY_CONFIGS[strategy["name"]].model_validate(strategy)
    return cfg.model_copy(update={"strategy": section, "optim": cfg.optim.model_copy(update={"lr": lr})})


def check_auto(cfg: PipelineConfig, full_lr: float | None) -> list[str]:
    """A race that fits its budget, and candidates that fit the model (checked as check_strategy
    checks a named strategy)."""
    if cfg.tune is not None:
        return ["strategy.name=auto races strategies itself: drop the tune section (finetune train or finetune advise "
                "run the race), or sweep named strategies with tune.search_space.strategy.name"]  # fmt: skip
    try:
        plan = race_plan(cfg, full_lr)
    except ValueError as error:
        return [str(error)]
    problems = []
    for candidate in plan.candidates:
        try:
            meta_training(candidate_config(cfg, candidate.strategy, candidate.lr))
        except ValueError as error:
            problems.append(f"strategy.name=auto: candidate {candidate.label}: {error}")
    return problems


def check_strategy(cfg: PipelineConfig, full_lr: float | None = None) -> list[str]:
    """Undeclarable layer groups, freeze_groups beyond the model's groups, a freeze regex or LoRA
    target that matches nothing, surgical groups the model lacks, an LP-FT probe as long as the
    run all show here instead of inside a Ray worker."""
    if cfg.strategy.name == "auto":
        return check_auto(cfg, full_lr)
    problems = []
    probe_epochs = getattr(cfg.strategy, "probe_epochs", None)
    if cfg.strategy.name == "lp_ft" and probe_epochs is not None and probe_epochs >= cfg.train.epochs:
        problems.append(f"strategy.probe_epochs={probe_epochs} with train.epochs={cfg.train.epochs}: the probe "
                        "takes the whole run and the body never trains; raise train.epochs, lower "
                        "strategy.probe_epochs, or use strategy.name=linear_probe")  # fmt: skip
    try:
        meta_training(cfg)
    except ValueError as error:  # UnknownArchitecture included
        problems.append(str(error))
    return problems


def describe_batchnorm(cfg: PipelineConfig) -> str | None:
    """What happens to the model's BatchNorm layers under this strategy (None: it has none)."""
    training = meta_training(cfg)
    return training.describe_batchnorm(cfg, cfg.model.batchnorm.recalibrate) if training else None


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
    """The one loader of a user's pipeline file: YAML, `a.b=c` overrides, then `check_pipeline`."""
    return check_pipeline(config_module.read_raw(path, overrides))


def check_pipeline(raw: dict) -> PipelineConfig:
    """A pipeline as a mapping (a file's YAML, overrides applied) through the schema, then the
    registries, the files and the strategy on the model's structure. A validated pipeline, or
    one ConfigError listing every problem found."""
    try:
        cfg = config_module.parse(raw)
    except ConfigError as error:
        raise ConfigError(error.problems + _registry_problems(raw)) from None
    problems = _registry_problems(raw)
    if not problems:
        problems = check_task(cfg) + check_splits(cfg) + check_text_length(cfg) + check_augmentation(cfg)
        problems += check_compile(cfg) + check_strategy(cfg, pipeline_lr(raw))
    problems += check_tracking(cfg.tracking)
    if cfg.tune is not None:
        problems += check_search_space(raw, cfg.tune) + check_search_alg(cfg.tune)
    if problems:
        raise ConfigError(problems)
    return cfg
