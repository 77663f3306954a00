"""The strategies by name (`strategy.name`), each with its config section: `@register_strategy(Config)`
on the strategy class fills both as finetune/strategies/ imports each strategy's module. The
pipeline schema builds its `strategy` union from `strategy_configs()`."""

from __future__ import annotations

from typing import get_args

STRATEGIES: dict[str, type] = {}


def register_strategy(config: type):
    """Register the decorated strategy class under its config's `name` literal; the class keeps
    its section as `Config`."""

    def register(cls: type) -> type:
        (name,) = get_args(config.model_fields["name"].annotation)
        cls.Config = config
        STRATEGIES[name] = cls
        return cls

    return register


def strategy_configs() -> dict[str, type]:
    """name -> config section of every strategy."""
    import finetune.strategies  # noqa: F401 - imports (registers) every strategy module

    return {name: cls.Config for name, cls in STRATEGIES.items()}
