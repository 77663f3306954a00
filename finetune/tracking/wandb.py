"""Weights & Biases: one W&B run per finetune run, offline mode written under the run folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config import WandbConfig, PipelineConfig


class WandbTracker:
    def __init__(self, cfg: WandbConfig, pipeline: PipelineConfig, run_dir: Path, state: dict,
                 group: str | None = None) -> None:  # fmt: skip
        """`group`: a sweep's trials share one (W&B's way of gathering the runs of a sweep)."""
        os.environ.setdefault("WANDB_SILENT", "true")  # W&B's own banner lines; its errors still show
        import wandb

        run_id = state.get("wandb_run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=cfg.project or pipeline.name, entity=cfg.entity, name=cfg.run_name or run_dir.name,
            id=run_id, resume="allow", mode=cfg.mode, dir=str(run_dir), config=pipeline.model_dump(mode="json"),
            # a run of its own even where another is still open in this process (a Tune actor
            # reused after a stopped trial, several runs from one notebook): W&B would hand back that one
            reinit="create_new",
            group=group, job_type="trial" if group else None,
            settings=wandb.Settings(console="off", save_code=False),
        )  # fmt: skip
        state["wandb_run_id"] = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict, best_dir: Path | None) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        self.run.finish()

    def fail(self, interrupted: bool) -> None:
        self.run.finish(exit_code=130 if interrupted else 1)
