"""MLflow through its client (MlflowClient), never the fluent API: the fluent API keeps one
active run per process, which concurrent runs in one process would share."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.tracking.config import MlflowConfig

if TYPE_CHECKING:
    from finetune.config import PipelineConfig

MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit); params: 100


def _client(tracking_uri: str):
    # MLflow's SQL store announces its table creation at INFO and trips SQLAlchemy's deprecation
    # warnings: its own business, not the user's
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)  # opens (and creates) the store now
    return client


def default_tracking_uri(runs_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_root.resolve() / 'mlflow.db'}"


class MlflowTracker:
    def __init__(self, cfg: MlflowConfig, pipeline: PipelineConfig, run_dir: Path, state: dict) -> None:
        from mlflow.entities import Param

        from finetune.tracking import flat_params

        tracking_uri = cfg.tracking_uri or default_tracking_uri(run_dir.parent)
        self.client = client = _client(tracking_uri)
        name = cfg.experiment or pipeline.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # artifacts of a local database beside it, not in the working directory's ./mlruns
            local = tracking_uri.startswith("sqlite:///")
            artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" if local else None
            experiment_id = client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)
        if run_id := state.get("mlflow_run_id"):
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=cfg.run_name or run_dir.name,
                                       tags={"finetune.run_dir": str(run_dir)}).info.run_id  # fmt: skip
            params = [Param(k, str(v)) for k, v in flat_params(pipeline).items()]
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start : start + 100])
            state.update(mlflow_run_id=run_id, mlflow_tracking_uri=tracking_uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + MAX_BATCH])

    def finish(self, summary: dict, best_dir: Path | None) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        if best_dir is not None:
            self.client.log_artifacts(self.run_id, str(best_dir), "best")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, interrupted: bool) -> None:
        self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")
