"""MLflow through its client (MlflowClient), never the fluent API: the fluent API keeps one
active run per process, which concurrent runs in one process would share."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config import MlflowConfig, PipelineConfig

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
    """One MLflow run; `parent` ({run_id, tracking_uri}): nested under a sweep's run, in its store
    and experiment."""

    def __init__(self, cfg: MlflowConfig, pipeline: PipelineConfig, run_dir: Path, state: dict,
                 parent: dict | None = None) -> None:  # fmt: skip
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from finetune.tracking import flat_params

        self.tracking_uri = (parent or {}).get("tracking_uri") or cfg.tracking_uri or default_tracking_uri(run_dir.parent)
        self.client = client = _client(self.tracking_uri)
        if run_id := state.get("mlflow_run_id"):
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {"finetune.run_dir": str(run_dir)}
            if parent:
                experiment_id = client.get_run(parent["run_id"]).info.experiment_id
                tags[MLFLOW_PARENT_RUN_ID] = parent["run_id"]
            else:
                experiment_id = self._experiment(cfg.experiment or pipeline.name)
            run_id = client.create_run(experiment_id, run_name=cfg.run_name if cfg.run_name and not parent else run_dir.name,
                                       tags=tags).info.run_id  # fmt: skip
            params = [Param(k, str(v)) for k, v in flat_params(pipeline).items()]
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start : start + 100])
            state.update(mlflow_run_id=run_id, mlflow_tracking_uri=self.tracking_uri)
        self.run_id = run_id

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # a local database's artifacts beside it, not in the working directory's ./mlruns
        local = self.tracking_uri.startswith("sqlite:///")
        artifacts = Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" if local else None
        return self.client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + MAX_BATCH])

    def close_children(self, outcomes: dict[str, str]) -> None:
        """Each nested run's status from its trial's outcome in the sweep (`outcomes[trial]`:
        finished, stopped_early or errored): Tune ends trials' processes itself (ASHA at max_t
        too), before or while a trial closes its own runs, so the sweep says the last word."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        status = {"finished": "FINISHED", "stopped_early": "KILLED", "errored": "FAILED"}
        for child in self.client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.run_id}'"):
            outcome = outcomes.get(child.info.run_name)
            if outcome is None:  # not a trial of this run of the sweep
                continue
            self.client.set_tag(child.info.run_id, "finetune.stopped_early", str(outcome == "stopped_early").lower())
            self.client.set_terminated(child.info.run_id, status[outcome])

    def finish(self, summary: dict, best_dir: Path | None) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        if best_dir is not None and best_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(best_dir), "best")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, interrupted: bool) -> None:
        self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")
