"""`finetune train` on the driver: data, TorchTrainer, live progress, run directory, summary."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer
from rich.console import Console
from rich.markup import escape

from finetune import config as config_module
from finetune import models
from finetune.models import batchnorm
from finetune.config import ConfigError, PipelineConfig
from finetune.data import DataError
from finetune.data.datasets import Datasets, build_datasets
from finetune.report import verdict
from finetune.report.progress import TrainingProgress, summary_table
from finetune.train.loop import TRAIN_STATE_FILE, train_loop_per_worker
from finetune.train.monitor import RunMonitor
from finetune.train import TrainingDiverged, tasks
from finetune.cluster import alive_nodes, on_driver_node, warn_if_data_starved
from finetune.train.storage import check_shared_storage


def default_run_dir(cfg: PipelineConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


class ShardingConfig(ray.train.DataConfig):
    """Training shards are equal (DDP needs the same step count on every rank); validation and
    test shards keep every row, so metrics cover the whole split whatever the worker count."""

    @staticmethod
    def default_ingest_options() -> ray.data.ExecutionOptions:
        """Ray's own, less `exclude_resources`: Ray Train copies that deprecated option from the
        DataContext, and Ray Data then warns in every run."""
        current = ray.data.DataContext.get_current().execution_options
        return ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                                         verbose_progress=current.verbose_progress)  # fmt: skip

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        train = {name: ds for name, ds in datasets.items() if name == "train"}
        shards = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in datasets.items():
            if name != "train":
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    shards[rank][name] = split
        return shards


def ingest_options(cfg: PipelineConfig) -> ray.data.ExecutionOptions:
    """Ray Data's options for the training datasets: data.preprocess_cpus caps the CPUs reading
    and preprocessing may take."""
    options = ShardingConfig.default_ingest_options()
    if cfg.data.preprocess_cpus:
        options.resource_limits = options.resource_limits.copy(cpu=cfg.data.preprocess_cpus)
    return options


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start an embedded local Ray."""
    if ray.is_initialized():
        return
    # Workers' own logs (model loading, Ray Train internals) stay in Ray's session folder;
    # the driver shows progress and errors. Worker exceptions still reach the driver.
    ray.init(log_to_driver=False, logging_level="WARNING", configure_logging=True)


def quiet_ray_data() -> None:
    # The live progress bar replaces Ray Data's per-dataset bars and execution notices.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Blocks reach the training loop in a fixed order, so a seeded run repeats exactly on one
    # worker. (With several, Ray's streaming split hands blocks to whichever worker asks first.)
    context.execution_options.preserve_order = True


def _best_checkpoint(result: ray.train.Result, best_epoch: int | None) -> ray.train.Checkpoint | None:
    """The checkpoint of the epoch the workers tested as best (Ray ranks checkpoints the same way)."""
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("epoch") == best_epoch:
            return checkpoint
    return None


def export_checkpoint(checkpoint: ray.train.Checkpoint, destination: Path) -> None:
    """The best epoch's model, without the optimizer state that only resuming needs."""
    with checkpoint.as_directory() as directory:
        shutil.copytree(directory, destination, ignore=shutil.ignore_patterns(TRAIN_STATE_FILE), dirs_exist_ok=True)


def _fit_with_progress(trainer, monitor, console, cfg, steps_per_epoch, run_dir) -> tuple[ray.train.Result, dict]:
    """Run fit() in a thread while the main thread shows progress and writes metrics.jsonl."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = error

    metrics_path = run_dir / "metrics.jsonl"
    # A resumed run keeps the epochs it finished before; an epoch it trains again replaces its line.
    earlier = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    events: dict = {"epochs": {e["epoch"]: e for e in earlier}, "starts": []}
    with metrics_path.open("a") as metrics_file, TrainingProgress(
        console, cfg.train.epochs, steps_per_epoch
    ) as progress:
        thread = threading.Thread(target=fit, name="finetune-fit", daemon=True)
        thread.start()
        seen = 0
        while True:
            finished = not thread.is_alive()
            latest, new_events = ray.get(monitor.poll.remote(seen))
            seen += len(new_events)
            if latest:
                progress.step(latest)
            for kind, metrics in new_events:
                if kind == "epoch" and events["epochs"].get(metrics["epoch"]) == metrics:
                    continue  # a resumed run resends the epochs before its checkpoint
                progress.event(kind, metrics)
                if kind == "epoch":
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                    events["epochs"][metrics["epoch"]] = metrics
                elif kind == "start":
                    events["starts"].append(metrics)
                else:
                    events[kind] = metrics
            if finished:
                break
            thread.join(timeout=0.5)
    events["epochs"] = [events["epochs"][epoch] for epoch in sorted(events["epochs"])]
    metrics_path.write_text("".join(json.dumps(e) + "\n" for e in events["epochs"]))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], events


def _summary(cfg, events, best_epoch, train_rows, wall_s, run_dir, has_best, skipped: dict) -> dict:
    final, epochs = events.get("final", {}), events["epochs"]
    group_starts = [s for s in events["starts"] if s["rank"] == 0]
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
                              if key.startswith(("val/", "train_eval/")) and not key.endswith("/samples")},  # fmt: skip
        "epochs": cfg.train.epochs,
        "epochs_run": len(epochs),
        "early_stopped": any(e.get("early_stopped") for e in epochs),  # train.early_stopping ended the run
        "train_rows": train_rows,
        "num_workers": cfg.scaling.num_workers,
        "train_samples_per_s": sum(e["train/samples"] for e in epochs) / train_seconds if train_seconds else None,
        "wall_s": wall_s,
        "run_dir": str(run_dir),
        "best_checkpoint": str(run_dir / "best") if has_best else None,
        "skipped_rows": skipped.get("counts", {}),
        # worker-group restarts after a failure (scaling.max_failures), each from the latest checkpoint
        "restarts": max(len(group_starts) - 1, 0),
        "resumed_from_epoch": group_starts[0]["start_epoch"] if group_starts else None,
        "restart_epochs": [s["start_epoch"] for s in group_starts[1:]],  # the epoch each restart began with
        # where the last worker group ran: one entry per rank
        "workers": sorted({s["rank"]: s for s in events["starts"]}.values(), key=lambda s: s["rank"]),
        "batchnorm": {"layers": events["batchnorm"]["layers"], "plan": events["batchnorm"]["text"],
                      "recalibrate_seconds": sum(e.get("batchnorm/recalibrate_seconds", 0.0) for e in epochs)}
        if "batchnorm" in events else None,  # fmt: skip
    }


def plan_epoch(cfg: PipelineConfig, train_rows: int) -> tuple[int, int]:
    """(batches, optimizer steps) per epoch on each worker, the same on every rank."""
    batches_per_epoch = (train_rows // cfg.scaling.num_workers) // cfg.train.batch_size
    steps_per_epoch = batches_per_epoch // cfg.train.grad_accum_steps
    if steps_per_epoch < 1:
        raise DataError(
            f"the training split has {train_rows} rows: too few for {cfg.scaling.num_workers} worker(s) x "
            f"train.batch_size={cfg.train.batch_size} x train.grad_accum_steps={cfg.train.grad_accum_steps}"
        )
    return batches_per_epoch, steps_per_epoch


def sample_rows(cfg: PipelineConfig) -> int:
    """Rows of the fixed training sample the workers evaluate (train.train_eval_rows) and
    recalibrate BatchNorm statistics on (model.batchnorm: recalibrate_batches per worker)."""
    rows = cfg.train.train_eval_rows
    bn = cfg.model.batchnorm
    if bn.recalibrate:
        model = models.meta_architecture(cfg.model, models.image_size_for(cfg.data))
        if model is None or batchnorm.batchnorm_layers(model):  # out of reach from here: assume it has some
            rows = max(rows, bn.recalibrate_batches * cfg.train.batch_size * cfg.scaling.num_workers)
    return rows


def pipeline_datasets(cfg: PipelineConfig) -> Datasets:
    return build_datasets(cfg.data, models.build_preprocessor(cfg.model, cfg.data), cfg.train.seed,
                          task=cfg.task.type, train_eval_rows=sample_rows(cfg))  # fmt: skip


def build_trainer(
    cfg: PipelineConfig, datasets: Datasets, batches_per_epoch: int, *, name: str, storage_path: str,
    monitor=None, callbacks: tuple = (),
) -> TorchTrainer:  # fmt: skip
    """The Ray Train run of one pipeline: `finetune train`, and each trial of `finetune tune`.
    A run with the name and storage of an earlier one resumes from its latest checkpoint."""
    label_stats = datasets.label_stats() if tasks.needs_label_stats(cfg.task, cfg.loss) else None
    task = tasks.build_task(cfg.task, datasets.label_names, label_stats)
    task.training_loss(cfg.loss, label_stats)  # per-label settings of the wrong length stop here, before Ray Train
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pipeline": cfg.model_dump(mode="json"),
            "label_names": datasets.label_names,
            "task": task.to_json(),
            "label_stats": label_stats,
            "batches_per_epoch": batches_per_epoch,
            "image_size": models.image_size_for(cfg.data),
            "has_train_eval": datasets.train_eval is not None,  # the fixed training sample is a dataset
            "monitor": monitor,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep,
                checkpoint_score_attribute=cfg.checkpoint.metric,
                checkpoint_score_order=cfg.checkpoint.mode,
            ),
            callbacks=list(callbacks),
        ),
        datasets=datasets.as_dict(),
        dataset_config=ShardingConfig(execution_options=ingest_options(cfg)),
    )


def run(cfg: PipelineConfig, run_dir: Path, console: Console | None = None, resume: bool = False) -> dict:
    """Fine-tune as configured; returns the summary also written to RUN_DIR/summary.json.
    `resume`: continue the run in `run_dir` from its latest checkpoint (Ray Train restores a run
    of the same name and storage)."""
    console = console or Console()
    started = time.time()
    run_dir = Path(run_dir).resolve()
    if not resume and (run_dir / "config.yaml").exists():
        raise ConfigError([f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --run-dir"])
    ensure_ray()
    warn_if_data_starved(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, console)
    storage_path = cfg.checkpoint.storage_path or str(run_dir / "ray")
    check_shared_storage(storage_path, cfg.checkpoint.storage_is_shared, alive_nodes())
    run_dir.mkdir(parents=True, exist_ok=True)
    config_module.save(cfg, run_dir / "config.yaml")
    console.print(f"run directory: {run_dir}")
    quiet_ray_data()
    datasets = pipeline_datasets(cfg)
    train_rows = datasets.train_rows
    batches_per_epoch, steps_per_epoch = plan_epoch(cfg, train_rows)
    console.print(
        f"{train_rows} training rows, {len(datasets.label_names)} labels, {cfg.scaling.num_workers} worker(s), "
        f"{steps_per_epoch} steps/epoch"
    )
    monitor = RunMonitor.options(scheduling_strategy=on_driver_node()).remote()
    trainer = build_trainer(cfg, datasets, batches_per_epoch, name=run_dir.name, storage_path=storage_path, monitor=monitor)

    try:
        result, events = _fit_with_progress(trainer, monitor, console, cfg, steps_per_epoch, run_dir)
        if "diverged" in events:
            raise TrainingDiverged(events["diverged"]["step"], events["diverged"]["epoch"])
        skipped = datasets.skipped_rows()
    except BaseException:
        kept = sorted(Path(storage_path, run_dir.name).glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
        if kept:
            console.print(f"training failed; the last good checkpoint is kept at {kept[-1]}", soft_wrap=True)
        raise
    finally:
        ray.kill(monitor)
        if datasets.bad_row_log is not None:
            ray.kill(datasets.bad_row_log)

    epochs = events["epochs"]
    best_epoch = epochs[-1]["best_epoch"] if epochs else None
    best = _best_checkpoint(result, best_epoch)
    if best is not None:
        export_checkpoint(best, run_dir / "best")
    summary = _summary(cfg, events, best_epoch, train_rows, time.time() - started, run_dir, best is not None, skipped)
    summary["warnings"] = verdict.check(summary, cfg.checkpoint.metric)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(summary_table(summary))
    for warning in summary["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if skipped:
        counts = ", ".join(f"{n} in {split}" for split, n in skipped["counts"].items())
        console.print(f"skipped bad rows (data.on_bad_rows=skip): {counts}; e.g. {skipped['examples'][0]}", soft_wrap=True)
    if summary["restarts"]:
        epochs = ", ".join(str(e + 1) for e in summary["restart_epochs"])
        console.print(f"the worker group restarted {summary['restarts']} time(s) from the latest checkpoint, at epoch {epochs}")
    nodes = {w["node_id"] for w in summary["workers"]}
    if len(nodes) > 1:
        console.print(f"{len(summary['workers'])} workers on {len(nodes)} nodes")
    console.print(f"best model: {summary['best_checkpoint']}\nrun directory: {run_dir}")
    return summary


def resume(run_dir: Path, console: Console | None = None) -> dict:
    """Continue a run whose driver died, from its latest checkpoint, with its saved config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (config.yaml missing)")
    console = console or Console()
    console.print(f"resuming {run_dir}")
    return run(config_module.load(run_dir / "config.yaml"), run_dir, console, resume=True)
