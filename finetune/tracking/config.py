"""The `tracking` section: which experiment trackers a run logs to. TensorBoard is on by
default (its writer comes with Ray Tune); MLflow and Weights & Biases are extras."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.config.base import Section


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None,
        description="An MLflow tracking server or database (http://host:5000, sqlite:///path/mlflow.db, databricks). "
        "Unset = MLFLOW_TRACKING_URI, else a local SQLite file beside the run folders (runs/mlflow.db; "
        "`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows it).",
    )
    experiment: str | None = Field(None, description="The MLflow experiment; unset = the pipeline's name.")
    run_name: str | None = Field(None, description="The MLflow run's name; unset = the run folder's name.")


class WandbConfig(Section):
    project: str | None = Field(None, description="The W&B project; unset = the pipeline's name.")
    entity: str | None = Field(None, description="The W&B team or user; unset = your default entity.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: write the run under <run dir>/wandb only (no network); `wandb sync` uploads it later."
    )
    run_name: str | None = Field(None, description="The W&B run's name; unset = the run folder's name.")


class TrackingConfig(Section):
    tensorboard: bool = Field(
        True, description="TensorBoard event files in <run dir>/tensorboard: `tensorboard --logdir runs`."
    )
    mlflow: MlflowConfig | None = Field(None, description="Log to MLflow ({} = the defaults; needs finetune[mlflow]).")
    wandb: WandbConfig | None = Field(None, description="Log to Weights & Biases ({} = the defaults; needs finetune[wandb]).")


EXTRAS = {"mlflow": ("mlflow", "MLflow"), "wandb": ("wandb", "Weights & Biases")}  # tracker: (module, name)


def check_tracking(cfg: TrackingConfig) -> list[str]:
    """A tracker asked for but not installed: say which extra brings it, before anything starts."""
    import importlib.util

    return [
        f'tracking.{tracker} needs {name}: pip install "finetune[{tracker}]" (in a checkout: pip install -e ".[{tracker}]")'
        for tracker, (module, name) in EXTRAS.items()
        if getattr(cfg, tracker) is not None and importlib.util.find_spec(module) is None
    ]
