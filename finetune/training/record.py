"""The driver's record of a run, folded from its events (`training.events`) in one place:
metrics.jsonl (one line per epoch, as it ends) and what summary.json says at the end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from finetune import files
from finetune.config import PipelineConfig
from finetune.training.events import (
    Baseline, BatchNormPlan, Diverged, EpochEnded, FinalTest, LayerGroups, RunEvent, WorkerPhases, WorkerStarted,
)  # fmt: skip


TEST_RESULTS = "test_results"  # RUN_DIR/test_results/: rows.npz (Task.eval_rows on test), mistakes.json


class RunRecord:
    """Every event of a run, kept: the epochs by number (a resumed run keeps the epochs it
    finished before; an epoch trained again replaces its line), each worker-group start, and
    the last of every other kind."""

    def __init__(self, metrics_path: Path) -> None:
        self.metrics_path = metrics_path
        # a driver killed mid-line leaves a torn last line: that epoch is trained again
        self.epochs: dict[int, dict] = {m["epoch"]: m for m in files.read_json_lines(metrics_path)}
        self.starts: list[WorkerStarted] = []
        self.groups: LayerGroups | None = None
        self.batchnorm: BatchNormPlan | None = None
        self.baseline: Baseline | None = None
        self.diverged: Diverged | None = None
        self.final: FinalTest | None = None
        self.phases: WorkerPhases | None = None

    def is_new(self, event: RunEvent) -> bool:
        """False for an epoch a restarted worker group resent unchanged."""
        return not isinstance(event, EpochEnded) or self.epochs.get(event.epoch) != event.metrics

    def fold(self, event: RunEvent) -> bool:
        """Keep `event`; False for an epoch a restarted worker group resent unchanged."""
        if not self.is_new(event):
            return False
        if isinstance(event, EpochEnded):
            self.epochs[event.epoch] = event.metrics
            files.append_line(self.metrics_path, json.dumps(event.metrics))
        elif isinstance(event, WorkerStarted):
            self.starts.append(event)
        else:
            attribute = {LayerGroups: "groups", BatchNormPlan: "batchnorm", Baseline: "baseline",
                         Diverged: "diverged", FinalTest: "final", WorkerPhases: "phases"}[type(event)]  # fmt: skip
            setattr(self, attribute, event)
            if isinstance(event, FinalTest) and event.rows:
                self._save_test_results(event)
        return True

    def _save_test_results(self, final: FinalTest) -> None:
        """The final test's per-row results and worst mistakes, which the report draws."""
        folder = self.metrics_path.parent / TEST_RESULTS
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **final.rows)
        files.write_bytes(folder / "rows.npz", buffer.getvalue())
        files.write_text(folder / "mistakes.json", json.dumps(final.mistakes))

    def close(self) -> None:
        """metrics.jsonl rewritten in epoch order, one line per epoch (a retrained epoch's last)."""
        files.write_text(self.metrics_path, "".join(json.dumps(e) + "\n" for e in self.epoch_list))

    @property
    def epoch_list(self) -> list[dict]:
        return [self.epochs[epoch] for epoch in sorted(self.epochs)]

    @property
    def best_epoch(self) -> int | None:
        epochs = self.epoch_list
        return epochs[-1]["best_epoch"] if epochs else None

    def summary(self, cfg: PipelineConfig, *, train_rows: int, wall_s: float, phases_s: dict[str, float], run_dir: Path,
                has_best: bool, skipped: dict) -> dict:  # fmt: skip
        """What summary.json says (verdict warnings are added by the driver)."""
        epochs, best_epoch = self.epoch_list, self.best_epoch
        final = self.final.metrics if self.final else {}
        group_starts = [s for s in self.starts if s.rank == 0]
        train_seconds = sum(e["train/seconds"] for e in epochs)
        # the task's test metrics after fine-tuning and before (new head only): test_accuracy,
        # baseline_test_accuracy, test_map, test_rmse, ... and test_samples
        tested = {key.replace("/", "_"): value for key, value in final.items()
                  if key.split("/")[0] in ("test", "baseline_test", "constant_test")}  # fmt: skip
        best = next((e for e in epochs if e["epoch"] == best_epoch), {})
        return {
            "task": cfg.task.type,
            **dict(sorted(tested.items(), key=lambda item: (item[0].startswith("constant"), item[0].startswith("baseline")))),
            "best_epoch": best_epoch,
            "best_val_metric": {cfg.checkpoint.metric: best[cfg.checkpoint.metric]} if best else None,
            # the best epoch on val and on a fixed sample of training rows (train_eval: same weights, eval mode)
            "best_epoch_scores": {key: value for key, value in best.items()
                                  if key.startswith(("val/", "train_eval/", "constant_train_eval/")) and not key.endswith("/samples")},  # fmt: skip
            "epochs": cfg.train.epochs,
            "epochs_run": len(epochs),
            "early_stopped": any(e.get("early_stopped") for e in epochs),  # train.early_stopping ended the run
            "train_rows": train_rows,
            "num_workers": cfg.scaling.num_workers,
            "train_samples_per_s": sum(e["train/samples"] for e in epochs) / train_seconds if train_seconds else None,
            "wall_s": wall_s,
            "phases_s": phases_s,  # where wall_s went (training.phases.PHASES says what each is)
            "run_dir": str(run_dir),
            "best_checkpoint": str(run_dir / "best") if has_best else None,
            "skipped_rows": skipped.get("counts", {}),
            "skipped_row_examples": skipped.get("examples", []),
            "layer_groups": self.groups.rows if self.groups else [],  # input -> output: lr (None: frozen), sizes
            # worker-group restarts after a failure (scaling.max_failures), each from the latest checkpoint
            "restarts": max(len(group_starts) - 1, 0),
            "resumed_from_epoch": group_starts[0].start_epoch if group_starts else None,
            "restart_epochs": [s.start_epoch for s in group_starts[1:]],  # the epoch each restart began with
            # where the last worker group ran: one entry per rank
            "workers": [vars(s) for s in sorted({s.rank: s for s in self.starts}.values(), key=lambda s: s.rank)],
            "batchnorm": {"layers": self.batchnorm.layers, "plan": self.batchnorm.text,
                          "recalibrate_seconds": sum(e.get("batchnorm/recalibrate_seconds", 0.0) for e in epochs)}
            if self.batchnorm else None,  # fmt: skip
        }
