"""The search space: `tune.search_space` as Ray Tune domains, and the pipeline a trial runs.

A trial's pipeline is the sweep's pipeline file with the trial's values set at their dotted
keys (the `tune` section removed), validated like any pipeline. A strategy key the trial's
strategy does not have (strategy.layer_decay when the trial drew strategy.name=full) is left
out of that trial, so one sweep can compare strategies and tune their own knobs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from finetune import config as config_module
from finetune.config import STRATEGY_CONFIGS, ConfigError, PipelineConfig, SearchDimension, TuneConfig


def to_domain(dimension: SearchDimension):
    from ray import tune

    low_high = dimension.spec
    return {
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "randint": lambda: tune.randint(*low_high),
        "choice": lambda: tune.choice(dimension.spec),
        "grid": lambda: tune.grid_search(dimension.spec),
    }[dimension.kind]()


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    return {key: to_domain(dimension) for key, dimension in cfg.search_space.items()}


def _strategy_keeps(raw: dict, key: str) -> bool:
    """Whether the strategy named in `raw` has the field a `strategy.x` key sets."""
    if not key.startswith("strategy.") or key.count(".") != 1:
        return True
    name = (raw.get("strategy") or {}).get("name", "full")
    strategy = STRATEGY_CONFIGS.get(name)
    return strategy is None or key.split(".", 1)[1] in strategy.model_fields


def trial_raw(base_raw: dict, params: dict[str, Any]) -> dict:
    """The raw pipeline of one trial: the base without its `tune` section, `params` set."""
    raw = copy.deepcopy(base_raw)
    tune_section = raw.pop("tune", None) or {}
    problems = []
    for key in sorted(params, key=lambda k: k != "strategy.name"):  # the strategy first: it decides its keys
        if _strategy_keeps(raw, key):
            problem = config_module.set_dotted(raw, key, params[key])
            if problem:
                problems.append(f"tune.search_space.{key}: {problem}")
    if problems:
        raise ConfigError(problems)
    # Trials keep (and the sweep ranks) their epochs by the metric the sweep optimises.
    if tune_section.get("metric"):
        checkpoint = raw.setdefault("checkpoint", {})
        checkpoint["metric"] = tune_section["metric"]
        checkpoint.pop("mode", None)
    return raw


def trial_config(base_raw: dict, params: dict[str, Any]) -> PipelineConfig:
    return config_module.parse(trial_raw(base_raw, params))


def used_params(base_raw: dict, params: dict[str, Any]) -> dict[str, Any]:
    """The searched values a trial actually runs with (strategy keys its strategy lacks dropped)."""
    raw = trial_raw(base_raw, {"strategy.name": params["strategy.name"]} if "strategy.name" in params else {})
    return {key: value for key, value in params.items() if _strategy_keeps(raw, key)}


def _candidates(dimension: SearchDimension) -> list[Any]:
    """Values that stand for the dimension when checking it: every choice, or the range's ends."""
    if dimension.kind in ("choice", "grid"):
        return list(dimension.spec)
    low, high = dimension.spec
    return [low, high - 1] if dimension.kind == "randint" else [low, high]


def check_search_space(base_raw: dict, cfg: TuneConfig) -> list[str]:
    """Every searched key with each of its values (range ends) must make a valid pipeline, under
    some searched strategy that has the key; problems name the key and the value."""
    strategies = cfg.search_space.get("strategy.name")
    strategy_names = _candidates(strategies) if strategies else [None]
    problems: list[str] = []
    for key, dimension in cfg.search_space.items():
        if key == "tune" or key.startswith("tune."):
            problems.append(f"tune.search_space.{key}: the sweep's own settings cannot be searched")
            continue
        if key == "strategy.name" and "auto" in _candidates(dimension):
            problems.append("tune.search_space.strategy.name: auto races strategies itself and cannot be a trial's "
                            "strategy; list named strategies")  # fmt: skip
            continue
        for value in _candidates(dimension):
            errors, used = [], False
            for name in strategy_names:
                params = {key: value} if name is None else {"strategy.name": name, key: value}
                raw = trial_raw(base_raw, {"strategy.name": name} if name is not None else {})
                if not _strategy_keeps(raw, key):
                    continue
                used = True
                try:
                    trial_config(base_raw, params)
                    errors = []
                    break
                except ConfigError as error:
                    errors = error.problems
            if not used:
                base_strategy = (trial_raw(base_raw, {}).get("strategy") or {}).get("name", "full")
                owner = "no searched strategy has" if strategies else f"strategy {base_strategy} has no"
                problems.append(f"tune.search_space.{key}: {owner} such key")
                break
            problems += [f"tune.search_space.{key}={value!r}: {problem}" for problem in errors]
    return problems


def trial_count(cfg: TuneConfig) -> int:
    """Trials the sweep runs: num_samples, times the grid's combinations."""
    return cfg.num_samples * math.prod(len(d.spec) for d in cfg.search_space.values() if d.kind == "grid")


SEARCH_PACKAGES = {"optuna": "optuna", "hyperopt": "hyperopt"}


def check_search_alg(cfg: TuneConfig) -> list[str]:
    """optuna / hyperopt are optional packages: say so before the sweep starts, not in a traceback."""
    package = SEARCH_PACKAGES.get(cfg.search_alg)
    if package is None:
        return []
    import importlib.util

    if importlib.util.find_spec(package) is None:
        return [f"tune.search_alg={cfg.search_alg} needs the {package} package: pip install {package} "
                '(or pip install "finetune[search]")']  # fmt: skip
    return []

