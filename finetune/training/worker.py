"""The Ray Train worker loop: what every DDP worker runs. `train_loop_per_worker` reads as the
outline; each step below it is a named function, in the order the outline calls them.

The Ray lines are few and marked: the dataset shards, DDP (`prepare_model`), the checkpoint it
resumes from, `ray.train.report`. The rest is plain PyTorch (steps.py, setup.py, state.py).
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
import time
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from finetune import models
from finetune.config import PipelineConfig
from finetune.data.augment import batch_mixer
from finetune.data.lengths import group_by_length
from finetune.models import batchnorm
from finetune.training import TrainingDiverged, controls, steps
from finetune.training.events import (
    Baseline, BatchNormPlan, Diverged, EpochEnded, EventSink, FinalTest, LayerGroups, StepProgress, WorkerStarted,
    WorkProgress,
)  # fmt: skip
from finetune.training.phases import PhaseClock
from finetune.training.setup import Training, build_training
from finetune.training.state import TrainState
from finetune.tasks import Task


MISTAKES_SHOWN = 12  # the worst test mistakes the report shows, with their inputs


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every worker (Ray Train's `train_loop_config={"spec": spec}`)."""

    pipeline: PipelineConfig
    task: Task  # labels, head width, loss, metrics
    label_stats: dict | None  # the training split's label sums (balanced class weights, regression scaling)
    batches_per_epoch: int  # per worker, the same on every rank (equal shards, full batches only)
    image_size: int
    has_train_eval: bool  # the fixed training sample is a dataset (train_eval metrics, BatchNorm recalibration)
    monitor: object | None = None  # the RunMonitor actor of the run's driver (a sweep trial's: its Tune actor)
    # a strategy race's rung: the run stops itself, untested, once this many epochs are checkpointed,
    # and a later fit of the same run continues on the same schedule (train.epochs still sets it)
    pause_after_epochs: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.pipeline.train.grad_accum_steps


def train_loop_per_worker(loop_config: dict) -> None:
    spec: WorkerSpec = loop_config["spec"]
    cfg = spec.pipeline
    clock = PhaseClock()  # where this worker group's time goes: summary.json "phases_s"
    with clock("model_setup"):
        worker = set_up(spec)  # model -> strategy -> optimizer -> schedule, loss, EMA, early stopping
        state = worker.new_state()
        if checkpoint := ray.train.get_checkpoint():  # a restarted worker group, or --resume
            with checkpoint.as_directory() as directory:
                state.load(directory)
    announce(worker, state)
    if state.next_epoch == 0:
        with clock("baseline"):
            state.baseline = evaluate_baseline(worker)
    for epoch in state.epochs_left(cfg.train.epochs):  # none once early stopping has stopped the run
        try:
            stats = train_one_epoch(worker, epoch)  # strategy hooks run at each step
        except TrainingDiverged as diverged:
            return stop_diverged(worker, state, epoch, diverged)
        clock.add("data_start", stats.first_batch_seconds)  # the data pipeline starting its epoch
        clock.add("training", stats.seconds - stats.first_batch_seconds)
        metrics = epoch_metrics(worker, epoch, stats)
        with clock("evaluation"):
            recalibrate_batchnorm(worker, metrics)
            metrics.update(validate(worker))
        stop = end_epoch(worker, state, epoch, metrics)
        with clock("checkpoints"):
            checkpoint_and_report(worker, state, metrics)
        if stop:
            break
        if epoch + 1 == spec.pause_after_epochs:
            worker.events.emit(clock.worker_phases())
            return
    with clock("test"):
        final_test(worker, state)
    worker.events.emit(clock.worker_phases())


@dataclass
class Worker:
    """One worker's run: its place in the group, its device, and what trains."""

    spec: WorkerSpec
    cfg: PipelineConfig
    rank: int
    world_size: int
    device: torch.device
    precision: str
    training: Training
    preprocessor: object  # saved with each checkpoint's model
    loss_fn: torch.nn.Module
    mix: object  # mixup/cutmix over a batch, or None
    scaler: torch.amp.GradScaler | None  # fp16 only
    ema: torch.nn.Module | None
    early_stopping: controls.EarlyStopping | None
    recalibrating: bool  # BatchNorm statistics recomputed before each validation
    events: EventSink

    @property
    def evaluated(self) -> torch.nn.Module:
        """What is validated, checkpointed and exported: the EMA of the weights when train.ema is on."""
        return self.ema.module if self.ema else self.training.module

    def new_state(self) -> TrainState:
        t = self.training
        return TrainState(t.module, self.evaluated, t.optimizer, t.scheduler, t.strategy, self.scaler, self.ema,
                          self.early_stopping)  # fmt: skip


def set_up(spec: WorkerSpec) -> Worker:
    cfg, task = spec.pipeline, spec.task
    context = ray.train.get_context()
    torch.set_num_threads(_threads_per_worker(cfg, context.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)  # same new-head init on every rank
    device = ray.train.torch.get_device()
    model = models.build_model(cfg.model, task.num_outputs, spec.image_size)
    training = build_training(cfg, model, spec.steps_per_epoch, world_size=context.get_world_size(),
                              device=device, wrap=_prepare_ddp)  # fmt: skip
    bn = cfg.model.batchnorm
    stopping = cfg.train.early_stopping
    precision = steps.resolve_precision(cfg.train.precision, device)
    worker = Worker(
        spec, cfg, context.get_world_rank(), context.get_world_size(), device, precision, training,
        preprocessor=models.build_preprocessor(cfg.model, cfg.data),
        loss_fn=task.training_loss(cfg.loss, spec.label_stats).to(device),
        mix=batch_mixer(cfg.data.mixup_alpha, cfg.data.cutmix_alpha, task.num_outputs),  # classification only
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        ema=controls.ema_model(training.module, cfg.train.ema),
        early_stopping=controls.EarlyStopping(stopping, stopping.metric) if stopping else None,
        recalibrating=bn.recalibrate and bool(training.train_modes.layers) and spec.has_train_eval,
        events=EventSink(spec.monitor, context.get_world_rank()),
    )  # fmt: skip
    worker.events.emit(LayerGroups(training.describe_groups()))
    if note := training.describe_batchnorm(cfg, worker.recalibrating):
        worker.events.emit(BatchNormPlan(note, len(training.train_modes.layers)))
    return worker


def announce(worker: Worker, state: TrainState) -> None:
    """Every rank, at every worker-group start: the driver counts restarts and names the nodes."""
    worker.events.emit(WorkerStarted(worker.rank, state.next_epoch, ray.get_runtime_context().get_node_id(),
                                     socket.gethostname(), os.getpid()))  # fmt: skip
    # the epochs before the checkpoint again: a driver that died right after the checkpoint
    # may not have written the last of them to metrics.jsonl
    for metrics in state.history:
        worker.events.emit(EpochEnded(metrics))


def evaluate_baseline(worker: Worker) -> dict[str, float]:
    """The pretrained backbone with its untrained head, on test."""
    baseline = {f"baseline_{k}": v for k, v in _evaluate(worker, worker.training.module, "test", what="baseline on test").items()}
    worker.events.emit(Baseline(baseline))
    return baseline


def train_one_epoch(worker: Worker, epoch: int) -> steps.EpochStats:
    cfg, training, per_epoch = worker.cfg, worker.training, worker.spec.steps_per_epoch
    local = cfg.data.shuffle == "local"
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.train.batch_size,
        drop_last=True,  # equal step counts on every rank, or DDP waits forever
        local_shuffle_buffer_size=cfg.data.shuffle_buffer if local else None,
        local_shuffle_seed=cfg.train.seed + epoch if local else None,
        prefetch_batches=cfg.data.prefetch_batches,
    )
    if cfg.data.group_by_length:
        batches = group_by_length(batches, seed=cfg.train.seed + epoch)
    module, strategy, ema = training.module, training.strategy, worker.ema
    reported = {"steps": 0, "loss_sum": 0.0}  # at the step progress before

    def on_step(step: int, loss: float, stats: steps.EpochStats) -> None:
        recent = (stats.loss_sum - reported["loss_sum"]) / max(step - reported["steps"], 1)
        reported.update(steps=step, loss_sum=stats.loss_sum)
        worker.events.step(StepProgress(epoch, step, per_epoch, loss, stats.samples_per_s * worker.world_size,
                                        recent, _group_lrs(training.optimizer)))  # fmt: skip

    return steps.train_epoch(
        training.model, batches, training.optimizer, training.scheduler, worker.loss_fn,
        device=worker.device, precision=worker.precision, max_steps=per_epoch,
        grad_accum_steps=cfg.train.grad_accum_steps, max_grad_norm=cfg.train.max_grad_norm,
        max_grad_value=cfg.train.max_grad_value, scaler=worker.scaler,
        penalty=lambda: strategy.penalty(module), on_step=on_step, report_every=cfg.train.log_every_steps,
        before_step=lambda step: strategy.before_step(epoch, epoch * per_epoch + step, module),
        after_step=(lambda: ema.update_parameters(module)) if ema else None,
        mix=worker.mix, reduce_min=_all_reduce(dist.ReduceOp.MIN), train_modes=training.train_modes.apply,
    )  # fmt: skip


def stop_diverged(worker: Worker, state: TrainState, epoch: int, diverged: TrainingDiverged) -> None:
    """Every rank stops here together; no checkpoint of these weights. The driver names the step
    and points at the last good checkpoint, and Ray does not retry a run that would diverge again."""
    step = epoch * worker.spec.steps_per_epoch + diverged.step
    worker.events.emit(Diverged(epoch, step))
    last = {"diverged_at_step": step, "epoch": epoch}
    if state.best.metric is not None:  # what a sweep ranks this trial by
        last[worker.cfg.checkpoint.metric] = state.best.metric
    ray.train.report(last, checkpoint=None)


def epoch_metrics(worker: Worker, epoch: int, stats: steps.EpochStats) -> dict:
    world = worker.world_size
    return {
        "epoch": epoch,
        # what a sweep's scheduler counts (ASHA rungs, tune.scheduler.time_attr)
        "epochs_done": epoch + 1,
        "steps_done": (epoch + 1) * worker.spec.steps_per_epoch,
        "train/loss": stats.loss,
        "train/samples": stats.samples * world,
        "train/samples_per_s": stats.samples_per_s * world,
        "train/seconds": stats.seconds,
        "train/data_wait_fraction": stats.data_wait_seconds / max(stats.seconds, 1e-9),
        "train/lr": worker.training.scheduler.get_last_lr()[0],
        "train/peak_memory_mb": peak_memory_mb(worker.device),
    }


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this worker has held: the accelerator's allocations, or on CPU the
    process's peak resident set (the model, optimizer state and activations, and the runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux


def recalibrate_batchnorm(worker: Worker, metrics: dict) -> None:
    """The statistics of these weights on this data, before anything is measured: the trained
    BatchNorm layers' statistics recomputed over the fixed training sample, all ranks together."""
    if not worker.recalibrating:
        return
    started = time.perf_counter()
    worker.events.step(WorkProgress("recalibrating BatchNorm", 0))
    module, evaluated, cfg = worker.training.module, worker.evaluated, worker.cfg
    tracked = set(batchnorm.batchnorm_layers(module)) - batchnorm.frozen_layers(module)
    # full batches only, as in training: batch statistics of a last batch of one row are undefined
    batches = ray.train.get_dataset_shard("train_eval").iter_torch_batches(
        batch_size=cfg.train.batch_size, drop_last=True, prefetch_batches=cfg.data.prefetch_batches
    )  # fmt: skip
    metrics["batchnorm/recalibrated_rows"] = batchnorm.recalibrate(
        evaluated, batches, tracked, lambda batch: steps.forward(evaluated, batch, worker.device, worker.precision),
        max_batches=cfg.model.batchnorm.recalibrate_batches, all_reduce_sum=_all_reduce(dist.ReduceOp.SUM),
    )  # fmt: skip
    metrics["batchnorm/recalibrate_seconds"] = time.perf_counter() - started


def validate(worker: Worker) -> dict[str, float]:
    """val, and the fixed training sample (train.train_eval_rows; the sample may be larger, for
    recalibration) with what a constant predictor scores on it: a model no better than that on
    training rows has not fit them, whatever val says (the verdict's overfitting check)."""
    metrics = {}
    if worker.cfg.train.train_eval_rows:
        per_rank = -(-worker.cfg.train.train_eval_rows // worker.world_size)
        rows = _evaluated_rows(worker, worker.evaluated, "train_eval", max_rows=per_rank)
        metrics.update({**worker.spec.task.metrics(rows, "train_eval"), **worker.spec.task.constant_metrics(rows, "train_eval")})
    metrics.update(_evaluate(worker, worker.evaluated, "val"))
    return metrics


def end_epoch(worker: Worker, state: TrainState, epoch: int, metrics: dict) -> bool:
    """The plateau schedule, the best epoch and early stopping see the epoch's metrics; True: stop."""
    cfg, scheduler = worker.cfg, worker.training.scheduler
    if hasattr(scheduler, "epoch_end"):  # schedule.name=plateau
        scheduler.epoch_end(metrics[cfg.schedule.metric])
    state.best.update(epoch, metrics[cfg.checkpoint.metric], cfg.checkpoint.mode, worker.evaluated)
    metrics["best_epoch"] = state.best.epoch
    stop = worker.early_stopping is not None and worker.early_stopping.should_stop(metrics)
    if stop:
        metrics["early_stopped"] = True
    state.epoch = epoch
    state.history.append(metrics)
    return stop


def checkpoint_and_report(worker: Worker, state: TrainState, metrics: dict) -> None:
    """The epoch's metrics to the driver and to Ray Train, with a checkpoint: the saved model
    (what `best/` exports) and the train state (what resuming needs)."""
    worker.events.emit(EpochEnded(metrics))
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if worker.rank == 0:  # one copy of the weights is enough; every rank holds the same
            spec = worker.spec
            models.save_model(worker.evaluated, directory, worker.cfg.model, worker.preprocessor, spec.task,
                              spec.image_size)  # fmt: skip
            state.save(directory)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def final_test(worker: Worker, state: TrainState) -> None:
    """The best epoch's weights on test, with what a constant predictor scores on the same rows; the
    per-row results and the worst mistakes go to the driver's report."""
    if state.best.weights is not None:
        worker.evaluated.load_state_dict(state.best.weights)
    task, worst = worker.spec.task, steps.WorstRows(worker.spec.task, MISTAKES_SHOWN)
    rows = _evaluated_rows(worker, worker.evaluated, "test", worst=worst)
    final = {**task.metrics(rows, "test"), **task.constant_metrics(rows, "test"), **state.baseline}
    final[worker.cfg.checkpoint.metric] = state.best.metric  # the tested weights' score; a sweep ranks every report by it
    mistakes = worst.gathered()
    if worker.rank == 0:
        described = [{**task.row_in_words(row), **worker.preprocessor.preview(inputs)} for _, inputs, row in mistakes]
        worker.events.emit(FinalTest(final, {name: values.numpy() for name, values in rows.items()}, described))
    ray.train.report(final, checkpoint=None)


# ---- helpers --------------------------------------------------------------------------------


SPLIT_WORK = {"test": "testing", "val": "validating", "train_eval": "scoring the train-eval sample"}


def _evaluate(worker: Worker, module, split: str, what: str | None = None) -> dict[str, float]:
    """`module`'s metrics on `split`."""
    return worker.spec.task.metrics(_evaluated_rows(worker, module, split, what=what), split)


def _evaluated_rows(worker: Worker, module, split: str, max_rows: int | None = None,
                    worst: steps.WorstRows | None = None, what: str | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every rank's per-row results on `split`. `module` unwrapped from DDP: ranks may differ in batch
    count, so evaluation runs without DDP's collectives; the rows are gathered from every rank once,
    at the end. `worst`: keeps this rank's worst mistakes. `what`: the progress display's words."""
    cfg = worker.cfg
    shard = ray.train.get_dataset_shard(split)
    batches = shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size, prefetch_batches=cfg.data.prefetch_batches)
    return steps.evaluate_rows(module, batches, worker.spec.task, device=worker.device, precision=worker.precision,
                               max_rows=max_rows, worst=worst, on_rows=_work_progress(worker, what or SPLIT_WORK[split]),
                               gather=True)  # fmt: skip


def _work_progress(worker: Worker, what: str):
    """Tells the driver what rank 0 is doing now, then its rows so far about once a second (rank 0's
    own rows: the others evaluate their shares at the same pace)."""
    worker.events.step(WorkProgress(what, 0))
    last = [time.monotonic()]

    def on_rows(rows: int) -> None:
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            worker.events.step(WorkProgress(what, rows * worker.world_size))

    return on_rows


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each layer group's learning rate now (its decayed and undecayed halves share it)."""
    return {group.get("name", f"group_{i}"): group["lr"] for i, group in enumerate(optimizer.param_groups)}


def _all_reduce(op):
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=op)
        return tensor

    return reduce


def _threads_per_worker(cfg: PipelineConfig, local_workers: int) -> int:
    if cfg.train.torch_threads:
        return cfg.train.torch_threads
    # Ray sets OMP_NUM_THREADS to the worker's (possibly fractional) CPU reservation, which
    # leaves cores idle; split the node's cores among its workers instead.
    return max(1, (os.cpu_count() or 1) // max(local_workers, 1))


def _prepare_ddp(model, param_groups: list[dict], freezes: bool):
    """DDP over every parameter the optimizer may ever step, then the strategy's freezing.

    DDP only synchronises parameters that require grad when it is built, so a parameter a
    strategy unfreezes later must be trainable at that moment; while frozen it has no
    gradient, which `find_unused_parameters` tells DDP to expect.
    """
    frozen_now = {id(p): not p.requires_grad for p in model.parameters()}
    in_optimizer = {id(p) for group in param_groups for p in group["params"]}
    for param in model.parameters():
        param.requires_grad_(id(param) in in_optimizer)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": freezes})
    for param in model.parameters():
        if frozen_now[id(param)]:
            param.requires_grad_(False)
    return model
