"""The library under `finetune train` and `finetune tune` (driver side): a pipeline's datasets,
its epoch plan, the Ray Train run of one pipeline (`build_trainer`), and the best checkpoint
exported as a saved model. The workers run `training.worker.train_loop_per_worker`."""

from __future__ import annotations

import shutil
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from finetune import files
from finetune import models
from finetune.config import PipelineConfig
from finetune.data import DataError
from finetune.data.datasets import Datasets, build_datasets
from finetune.models import batchnorm
from finetune import tasks
from finetune.training.state import TRAIN_STATE_FILE
from finetune.training.worker import WorkerSpec, train_loop_per_worker


class ShardingConfig(ray.train.DataConfig):
    """Training shards are equal (DDP needs the same step count on every rank); validation and
    test shards keep every row, so metrics cover the whole split whatever the worker count.
    A single worker iterates its datasets itself: a streaming_split coordinator is one Ray actor
    per dataset, and starting the three cost 11 s of a tiny run's 27 s while sharding nothing."""

    @staticmethod
    def default_ingest_options() -> ray.data.ExecutionOptions:
        """Ray's own, less `exclude_resources`: Ray Train copies that deprecated option from the
        DataContext, and Ray Data then warns in every run."""
        current = ray.data.DataContext.get_current().execution_options
        return ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                                         verbose_progress=current.verbose_progress)  # fmt: skip

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if world_size == 1:
            return [{name: self._ingest_copy(name, ds).iterator() for name, ds in datasets.items()}]
        train = {name: ds for name, ds in datasets.items() if name == "train"}
        shards = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in datasets.items():
            if name != "train":
                splits = self._ingest_copy(name, ds).streaming_split(world_size, equal=False)
                for rank, split in enumerate(splits):
                    shards[rank][name] = split
        return shards

    def _ingest_copy(self, name: str, ds: ray.data.Dataset) -> ray.data.Dataset:
        if ds.name is None:
            ds.set_name(name)  # as Ray's own configure does: the name its progress and metrics show
        ds = ds.copy(ds)
        ds.context.execution_options = self._resolve_execution_options(name)
        return ds


def ingest_options(cfg: PipelineConfig) -> ray.data.ExecutionOptions:
    """Ray Data's options for the training datasets: data.preprocess_cpus caps the CPUs reading
    and preprocessing may take."""
    options = ShardingConfig.default_ingest_options()
    if cfg.data.preprocess_cpus:
        options.resource_limits = options.resource_limits.copy(cpu=cfg.data.preprocess_cpus)
    return options


def best_checkpoint(result: ray.train.Result, best_epoch: int | None) -> ray.train.Checkpoint | None:
    """The checkpoint of the epoch the workers tested as best (Ray ranks checkpoints the same way)."""
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("epoch") == best_epoch:
            return checkpoint
    return None


def export_checkpoint(checkpoint: ray.train.Checkpoint, destination: Path) -> None:
    """The best epoch's model, without the optimizer state that only resuming needs."""
    def copy(folder: Path) -> None:
        with checkpoint.as_directory() as directory:
            shutil.copytree(directory, folder, ignore=shutil.ignore_patterns(TRAIN_STATE_FILE), dirs_exist_ok=True)

    files.replace_dir(destination, copy)  # a kill or a full disk leaves the previous best/ whole


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
    monitor=None, callbacks: tuple = (), pause_after_epochs: int | None = None,
) -> TorchTrainer:  # fmt: skip
    """The Ray Train run of one pipeline: `finetune train`, and each trial of `finetune tune`.
    A run with the name and storage of an earlier one resumes from its latest checkpoint
    (`pause_after_epochs`: WorkerSpec's)."""
    label_stats = datasets.label_stats() if tasks.needs_label_stats(cfg.task, cfg.loss) else None
    task = tasks.build_task(cfg.task, datasets.label_names, label_stats)
    task.training_loss(cfg.loss, label_stats)  # per-label settings of the wrong length stop here, before Ray Train
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": WorkerSpec(
            cfg, task, label_stats, batches_per_epoch, models.image_size_for(cfg.data),
            has_train_eval=datasets.train_eval is not None, monitor=monitor, pause_after_epochs=pause_after_epochs,
        )},  # fmt: skip
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


