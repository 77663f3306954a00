"""The Ray Train worker loop: what every DDP worker runs, top to bottom.

  1. build the model and the strategy's param groups, wrap in DDP
  2. evaluate the untouched model (new head only) on test: the baseline
  3. per epoch: strategy hook, train on this worker's shard, recalibrate BatchNorm statistics,
     evaluate a fixed training sample (train_eval) and val, report metrics + checkpoint to Ray Train
  4. evaluate the best epoch's weights on test, report the final metrics
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from finetune import models
from finetune.config import PipelineConfig, metric_mode
from finetune.data.augment import batch_mixer
from finetune.models import batchnorm
from finetune.models.groups import layer_groups
from finetune.strategies import build_strategy
from finetune.train import TrainingDiverged, controls, optim, steps, tasks

TRAIN_STATE_FILE = "train_state.pt"


def _evaluate(module, split: str, cfg: PipelineConfig, task: tasks.Task, device, precision,
              constant: bool = False, max_rows: int | None = None) -> dict[str, float]:  # fmt: skip
    """`module` unwrapped from DDP: ranks may differ in batch count, so evaluation runs without DDP's
    collectives; the rows are gathered from every rank once, at the end. `constant`: also what a
    predictor that ignores its input scores on these rows. `max_rows`: per rank."""
    shard = ray.train.get_dataset_shard(split)
    batches = shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size, prefetch_batches=cfg.data.prefetch_batches)
    rows = steps.evaluate_rows(module, batches, task, device=device, precision=precision, max_rows=max_rows)
    rows = steps.all_gather_rows(rows)
    return {**task.metrics(rows, split), **(task.constant_metrics(rows, split) if constant else {})}


def _recalibrate(target, layers: set[str], cfg: PipelineConfig, device, precision) -> int:
    """BatchNorm statistics of `layers` recomputed over the fixed training sample (all ranks together)."""
    shard = ray.train.get_dataset_shard("train_eval")
    # full batches only, as in training: batch statistics of a last batch of one row are undefined
    batches = shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True,
                                       prefetch_batches=cfg.data.prefetch_batches)  # fmt: skip
    return batchnorm.recalibrate(
        target, batches, layers, lambda batch: steps.forward(target, batch, device, precision),
        max_batches=cfg.model.batchnorm.recalibrate_batches, all_reduce_sum=_all_reduce(dist.ReduceOp.SUM),
    )  # fmt: skip


def _all_reduce(op):
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=op)
        return tensor

    return reduce


def _threads_per_worker(cfg: PipelineConfig) -> int:
    if cfg.train.torch_threads:
        return cfg.train.torch_threads
    # Ray sets OMP_NUM_THREADS to the worker's (possibly fractional) CPU reservation, which
    # leaves cores idle; split the node's cores among its workers instead.
    local_workers = ray.train.get_context().get_local_world_size()
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


def describe_groups(groups, param_groups: list[dict]) -> list[dict]:
    """One row per layer group: its learning rate (None: frozen for good) and size."""
    lrs = {id(p): g["lr"] for g in param_groups for p in g["params"]}
    return [
        {"group": group.name, "params": group.size,
         "lr": next((lrs[id(p)] for p in group.params.values() if id(p) in lrs), None),
         "trainable_now": sum(p.numel() for p in group.params.values() if p.requires_grad)}
        for group in groups
    ]  # fmt: skip


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    label_names: list[str] = loop_config["label_names"]
    task = tasks.task_from_json(loop_config["task"], label_names)
    # Optimizer steps per epoch, the same on every rank (equal shards, full batches only).
    steps_per_epoch: int = loop_config["batches_per_epoch"] // cfg.train.grad_accum_steps
    image_size: int = loop_config["image_size"]
    monitor = loop_config.get("monitor")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    torch.set_num_threads(_threads_per_worker(cfg))
    torch.manual_seed(cfg.train.seed)  # same new-head init on every rank
    device = ray.train.torch.get_device()
    precision = steps.resolve_precision(cfg.train.precision, device)

    # ---- 1. model, strategy, optimizer -------------------------------------------------------
    model = models.build_model(cfg.model, task.num_outputs, image_size)
    batchnorm.set_momentum(model, cfg.model.batchnorm.momentum)
    if cfg.model.batchnorm.sync and world_size > 1:  # same Parameter objects: groups and strategies are unaffected
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    strategy = build_strategy(cfg.strategy)
    strategy.adapt(model)
    groups = layer_groups(model, cfg.model.layer_groups)
    param_groups = strategy.setup(model, groups, cfg.optim.lr)
    model = _prepare_ddp(steps.to_device(model, device), param_groups, strategy.freezes)
    module = getattr(model, "module", model)
    optimizer = optim.build_optimizer(optim.split_weight_decay(param_groups, module, cfg.optim), cfg.optim)
    bn_cfg = cfg.model.batchnorm
    # a BatchNorm layer frozen with its group runs in eval mode; a group that thaws tracks again
    train_modes = batchnorm.TrainModes(module, bn_cfg.freeze_statistics)
    recalibrating = bn_cfg.recalibrate and bool(train_modes.layers) and loop_config.get("has_train_eval", False)
    if monitor and rank == 0:
        monitor.record.remote("groups", describe_groups(groups, param_groups))
        note = batchnorm.describe(module, batchnorm.frozen_layers(module),
                                  bn_cfg.recalibrate_batches if recalibrating else None, bn_cfg.freeze_statistics)  # fmt: skip
        if note:
            monitor.record.remote("batchnorm", {"text": note, "layers": len(train_modes.layers)})
    total_steps = steps_per_epoch * cfg.train.epochs
    plateau_metric = cfg.schedule.metric or cfg.checkpoint.metric
    scheduler = optim.build_scheduler(optimizer, cfg.schedule, total_steps, steps_per_epoch,
                                      plateau_mode=metric_mode(plateau_metric))  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    loss_fn = task.training_loss(cfg.loss, loop_config.get("label_stats")).to(device)
    mix = batch_mixer(cfg.data.mixup_alpha, cfg.data.cutmix_alpha, task.num_outputs)  # classification only
    # What is evaluated, checkpointed and exported: the EMA of the weights when train.ema is on.
    ema = controls.ema_model(module, cfg.train.ema)
    evaluated = ema.module if ema else module
    stopper = controls.EarlyStopping(cfg.train.early_stopping, cfg.train.early_stopping.metric or cfg.checkpoint.metric) \
        if cfg.train.early_stopping else None  # fmt: skip

    start_epoch, best, baseline, history = 0, {"metric": None, "epoch": None, "state": None}, {}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema:
            ema.load_state_dict(state["ema"])
        if stopper:
            stopper.load_state_dict(state["early_stopping"])
        start_epoch, best, baseline = state["epoch"] + 1, state["best"], state["baseline"]
        history = state.get("history", [])  # checkpoints written before it was kept have none
        if best["state"] is None:  # the checkpoint's own epoch was the best
            best["state"] = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
        if stopper and stopper.epochs_without_improvement >= stopper.cfg.patience:
            start_epoch = cfg.train.epochs  # it had stopped early: straight to the test

    if monitor:  # every rank, at every worker-group start: the driver counts restarts and names the nodes
        monitor.record.remote("start", {
            "rank": rank, "start_epoch": start_epoch, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(),
        })  # fmt: skip
        if rank == 0:
            # the epochs before the checkpoint again: a driver that died right after the
            # checkpoint may not have written the last of them to metrics.jsonl
            for metrics in history:
                monitor.record.remote("epoch", metrics)

    # ---- 2. baseline: the pretrained backbone with its untrained head -----------------------
    if start_epoch == 0:
        baseline = _evaluate(module, "test", cfg, task, device, precision)
        baseline = {f"baseline_{k}": v for k, v in baseline.items()}
        if monitor and rank == 0:
            monitor.record.remote("baseline", baseline)

    # ---- 3. epochs -----------------------------------------------------------------------
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.train.epochs):
        local = cfg.data.shuffle == "local"
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            drop_last=True,  # equal step counts on every rank, or DDP waits forever
            local_shuffle_buffer_size=cfg.data.shuffle_buffer if local else None,
            local_shuffle_seed=cfg.train.seed + epoch if local else None,
            prefetch_batches=cfg.data.prefetch_batches,
        )

        def on_step(step: int, loss: float, stats: steps.EpochStats, epoch=epoch) -> None:
            if monitor and rank == 0:
                monitor.progress.remote(epoch, step, steps_per_epoch, loss, stats.samples_per_s * world_size)

        try:
            stats = steps.train_epoch(
                model, batches, optimizer, scheduler, loss_fn,
                device=device, precision=precision, max_steps=steps_per_epoch,
                grad_accum_steps=cfg.train.grad_accum_steps, max_grad_norm=cfg.train.max_grad_norm,
                max_grad_value=cfg.train.max_grad_value, scaler=scaler, penalty=lambda: strategy.penalty(module),
                on_step=on_step, report_every=cfg.train.log_every_steps,
                before_step=lambda step, epoch=epoch: strategy.before_step(epoch, epoch * steps_per_epoch + step, module),
                after_step=(lambda: ema.update_parameters(module)) if ema else None,
                mix=mix, reduce_min=_all_reduce(dist.ReduceOp.MIN), train_modes=train_modes.apply,
            )  # fmt: skip
        except TrainingDiverged as diverged:
            # Every rank stops here together; no checkpoint of these weights. The driver names the
            # step and points at the last good checkpoint, and Ray does not retry a run that
            # would diverge again.
            stopped = {"epoch": epoch, "step": epoch * steps_per_epoch + diverged.step}
            if monitor and rank == 0:
                monitor.record.remote("diverged", stopped)
            last = {"diverged_at_step": stopped["step"], "epoch": epoch}
            if best["metric"] is not None:  # what a sweep ranks this trial by
                last[cfg.checkpoint.metric] = best["metric"]
            ray.train.report(last, checkpoint=None)
            return
        metrics = {
            "epoch": epoch,
            # what a sweep's scheduler counts (ASHA rungs, tune.scheduler.time_attr)
            "epochs_done": epoch + 1,
            "steps_done": (epoch + 1) * steps_per_epoch,
            "train/loss": stats.loss,
            "train/samples": stats.samples * world_size,
            "train/samples_per_s": stats.samples_per_s * world_size,
            "train/seconds": stats.seconds,
            "train/data_wait_fraction": stats.data_wait_seconds / max(stats.seconds, 1e-9),
            "train/lr": scheduler.get_last_lr()[0],
        }
        if recalibrating:  # the statistics of these weights on this data, before anything is measured
            started = time.perf_counter()
            tracked = set(batchnorm.batchnorm_layers(module)) - batchnorm.frozen_layers(module)
            metrics["batchnorm/recalibrated_rows"] = _recalibrate(evaluated, tracked, cfg, device, precision)
            metrics["batchnorm/recalibrate_seconds"] = time.perf_counter() - started
        if cfg.train.train_eval_rows:  # the sample may be larger, for recalibration
            metrics.update(_evaluate(evaluated, "train_eval", cfg, task, device, precision,
                                     max_rows=-(-cfg.train.train_eval_rows // world_size)))  # fmt: skip
        metrics.update(_evaluate(evaluated, "val", cfg, task, device, precision))
        if hasattr(scheduler, "epoch_end"):  # schedule.name=plateau
            scheduler.epoch_end(metrics[plateau_metric])
        score = metrics[cfg.checkpoint.metric]
        # Ties go to the later epoch, as in Ray Train's checkpoint ranking, so the weights tested
        # here are the checkpoint Ray keeps as best.
        if best["metric"] is None or (score >= best["metric"] if cfg.checkpoint.mode == "max" else score <= best["metric"]):
            best = {"metric": score, "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}}  # fmt: skip
        metrics["best_epoch"] = best["epoch"]
        stop_now = stopper is not None and stopper.should_stop(metrics)
        if stop_now:
            metrics["early_stopped"] = True
        history.append(metrics)
        if monitor and rank == 0:
            monitor.record.remote("epoch", metrics)

        with tempfile.TemporaryDirectory() as directory:
            ckpt = None
            if rank == 0:  # one copy of the weights is enough; every rank holds the same
                models.save_model(evaluated, directory, cfg.model, preprocessor, task, image_size)
                torch.save(
                    {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "baseline": baseline, "history": history,
                     "ema": ema.state_dict() if ema else None,
                     "early_stopping": stopper.state_dict() if stopper else None,
                     # the best weights only when they differ from this epoch's (saves a copy)
                     "best": {**best, "state": best["state"] if best["epoch"] != epoch else None}},
                    Path(directory) / TRAIN_STATE_FILE,
                )  # fmt: skip
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop_now:
            break

    # ---- 4. test the best epoch's weights ------------------------------------------------
    if best["state"] is not None:
        evaluated.load_state_dict(best["state"])
    final = _evaluate(evaluated, "test", cfg, task, device, precision, constant=True)
    final.update(baseline)
    final[cfg.checkpoint.metric] = best["metric"]  # the tested weights' score; a sweep ranks every report by it
    if monitor and rank == 0:
        monitor.record.remote("final", final)
    ray.train.report(final, checkpoint=None)
