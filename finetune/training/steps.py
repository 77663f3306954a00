"""The per-step training code, plain PyTorch: no Ray import, so it runs and is measured
anywhere (a GPU box without Ray, a benchmark's bare loop) exactly as in a Ray Train worker.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from finetune.data import windows
from finetune.data.lengths import sorted_groups
from finetune.data.preprocess import trim_padding
from finetune.training import TrainingDiverged
from finetune.tasks import Task


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 where the hardware runs it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return "bf16" if mkldnn_bf16 is not None and mkldnn_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """On a GPU a convolutional net's weights go channels-last (NHWC), which cuDNN's fast
    depthwise and bf16 kernels want; an NCHW input then comes out of the first convolution
    NHWC, and the whole net runs in that layout."""
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, precision: str) -> torch.Tensor:
    """The model's outputs for one batch, under the run's autocast."""
    inputs, _ = split_batch(batch, device)
    with autocast(precision, device):
        return model(**inputs)


def split_batch(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs (padding trimmed) and labels, on the training device; a window's text and
    place (data.long_text=windows) are no input."""
    batch = trim_padding(batch)
    labels = batch["label"].to(device, non_blocking=True)
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "label" and k not in windows.COLUMNS}
    return inputs, labels


NO_BAD_STEP = 2**62


@dataclass
class EpochStats:
    steps: int = 0  # optimizer steps
    samples: int = 0
    loss_sum: float | torch.Tensor = 0.0  # a device tensor during the epoch: read only when reported
    seconds: float = 0.0
    data_wait_seconds: float = 0.0  # time blocked on the next batch
    first_batch_seconds: float = 0.0  # of which waiting for the first: the data pipeline starting

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / max(self.steps, 1)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def _timed(batches: Iterable, stats: EpochStats) -> Iterator:
    iterator = iter(batches)
    first = True
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        waited = time.perf_counter() - start
        if first:
            stats.first_batch_seconds, first = waited, False
        stats.data_wait_seconds += waited
        yield batch


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    precision: str,
    max_steps: int,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = None,
    max_grad_value: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    penalty: Callable[[], torch.Tensor | None] | None = None,
    on_step: Callable[[int, float, EpochStats], None] | None = None,
    report_every: int = 1,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[], None] | None = None,
    mix: Callable | None = None,
    reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
    train_modes: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass: forward, backward, (accumulate), clip, step. After `max_steps` optimizer steps
    the remaining batches are drained unused, so every DDP rank takes the same number of
    collective steps and the data iterator still ends its epoch cleanly.

    `train_modes()` runs after model.train() and after each `before_step`: it puts layers that
    must not train in eval mode (BatchNorm layers of frozen groups, `batchnorm.TrainModes`).

    `on_step(step, mean loss, stats)` runs every `report_every` steps and at the last; only
    then is the loss copied off the device, so a GPU runs ahead of Python in between. The same
    steps check for a NaN/infinite loss (on every rank at once, `reduce_min` being an all-reduce
    under DDP) and raise TrainingDiverged naming the first bad step."""
    model.train()
    if train_modes:
        train_modes()
    stats = EpochStats()
    start = time.perf_counter()
    micro = 0
    window_loss = 0.0
    first_bad = torch.tensor(NO_BAD_STEP, device=device)  # the first step with a non-finite loss, kept on the device
    for batch in _timed(batches, stats):
        if stats.steps >= max_steps:
            continue
        if before_step and micro % grad_accum_steps == 0:
            before_step(stats.steps)  # a window's first micro-batch: the trainable set may change here
            if train_modes:
                train_modes()
        inputs, labels = split_batch(batch, device)
        if mix:  # mixup/cutmix: mixed inputs, soft labels (cross-entropy takes class probabilities)
            inputs, labels = mix(inputs, labels)
        last_micro = (micro + 1) % grad_accum_steps == 0
        # DDP: gradients are all-reduced only on the micro-step that ends an accumulation window.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(precision, device):
                logits = model(**inputs)
            loss = loss_fn(logits.float(), labels)
            extra = penalty() if penalty else None  # a strategy's regulariser, e.g. L2-SP
            if extra is not None:
                loss = loss + extra
            loss = loss / grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
        window_loss += loss.detach()
        first_bad = torch.where(~torch.isfinite(loss.detach()), torch.clamp(first_bad, max=stats.steps), first_bad)
        stats.samples += len(labels)
        micro += 1
        if not last_micro:
            continue
        if scaler:
            scaler.unscale_(optimizer)
        if max_grad_value:
            torch.nn.utils.clip_grad_value_(model.parameters(), max_grad_value)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step:
            after_step()
        stats.steps += 1
        stats.loss_sum += window_loss
        window_loss = 0.0
        if stats.steps % report_every == 0 or stats.steps == max_steps:
            _check_finite(first_bad, reduce_min)
            if on_step:
                stats.loss_sum = float(stats.loss_sum)
                stats.seconds = time.perf_counter() - start
                on_step(stats.steps, stats.loss_sum / stats.steps, stats)
    _check_finite(first_bad, reduce_min)
    stats.loss_sum = float(stats.loss_sum)
    stats.seconds = time.perf_counter() - start
    return stats


def _check_finite(first_bad: torch.Tensor, reduce_min) -> None:
    # Every rank checks at the same steps and raises together: the earliest bad step of any rank.
    step = int(reduce_min(first_bad.clone()) if reduce_min else first_bad)
    if step != NO_BAD_STEP:
        raise TrainingDiverged(step)


@torch.no_grad()
def evaluate_rows(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    task: Task,
    *,
    device: torch.device,
    precision: str,
    max_rows: int | None = None,
    worst: WorstRows | None = None,
    on_rows: Callable[[int], None] | None = None,
    gather: bool = False,
) -> dict[str, torch.Tensor]:
    """The task's per-row results (plain loss, targets, predictions or scores) over `batches`, on
    the CPU. Texts run in groups sorted by length (half the padding; finetune.data.lengths). After
    `max_rows` rows the remaining batches are drained unused (the data iterator still ends its
    epoch cleanly). `worst`: keeps the worst mistakes' inputs. `on_rows(rows)`: after each group,
    the rows evaluated so far. `gather`: every DDP rank's rows (all_gather_rows), the same on every
    rank. Windows of long texts (data.long_text=windows) are pooled per text (after the gather),
    so each row is a text, its mistake shown by its first window."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    firsts: list[tuple[int, dict[str, torch.Tensor]]] = []  # windows: the first window's inputs per text, for `worst`
    rows = 0
    for group, restore in sorted_groups(_first_rows(batches, max_rows)):
        results: dict[str, list[torch.Tensor]] = {}
        for batch in group:
            inputs, labels = split_batch(batch, device)
            with autocast(precision, device):
                outputs = model(**inputs)
            batch_results = batch_rows(task, outputs, labels, batch)
            if worst is not None and windows.TEXT_ID in batch:
                firsts += [(int(batch[windows.TEXT_ID][i]), {name: values[i].cpu() for name, values in inputs.items()})
                           for i in torch.nonzero(batch[windows.WINDOW] == 0).flatten().tolist()]  # fmt: skip
            elif worst is not None:
                worst.offer(inputs, batch_results)
            for name, values in batch_results.items():
                results.setdefault(name, []).append(values)
        for name, values in results.items():
            merged = torch.cat(values)
            parts.setdefault(name, []).append(merged if restore is None else merged[restore])
        rows += sum(len(batch["label"]) for batch in group)
        if on_rows is not None:
            on_rows(rows)
    evaluated = {name: torch.cat(values) for name, values in parts.items()} if parts else {"loss": torch.zeros(0)}
    if gather:
        evaluated = all_gather_rows(evaluated)
    return pooled_rows(evaluated, task, worst, firsts)


def batch_rows(task: Task, outputs: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's per-row results: the task's, or for the windows of long texts (data.long_text=windows)
    their logits, labels and text ids, the task's results coming once a text's windows are together
    (pooled_rows)."""
    if windows.TEXT_ID in batch:
        return {"logits": outputs.float().cpu(), "label": labels.cpu(), windows.TEXT_ID: batch[windows.TEXT_ID]}
    return task.eval_rows(outputs.float(), labels)


def pooled_rows(rows: dict[str, torch.Tensor], task: Task, worst: WorstRows | None = None,
                firsts: list[tuple[int, dict[str, torch.Tensor]]] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """`batch_rows`' results of a whole split: windows' logits, labels and text ids as their texts'
    task results (windows.pool), other rows as they are; `worst` offered the texts whose first
    window this process read (`firsts`), that window the input shown."""
    if windows.TEXT_ID not in rows:
        return rows
    logits, texts, first = windows.pool(rows["logits"], rows[windows.TEXT_ID])
    results = task.eval_rows(logits, rows["label"][first])
    if worst is not None and firsts:
        at = torch.searchsorted(texts, torch.tensor([text for text, _ in firsts]))
        inputs = {name: nn.utils.rnn.pad_sequence([row[name] for _, row in firsts], batch_first=True)
                  for name in firsts[0][1]}  # fmt: skip
        worst.offer(inputs, {name: values[at] for name, values in results.items()})
    return results


def _first_rows(batches: Iterable[dict[str, torch.Tensor]], max_rows: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """`batches` cut after `max_rows` rows; the rest drained unused."""
    rows = 0
    for batch in batches:
        if max_rows is not None:
            if rows >= max_rows:
                continue
            batch = {name: values[: max_rows - rows] for name, values in batch.items()}
        rows += len(batch["label"])
        yield batch


class WorstRows:
    """The `limit` worst mistakes seen (`Task.mistake_order`), each with the inputs the model saw
    and its evaluated row: what the report shows as examples."""

    def __init__(self, task: Task, limit: int) -> None:
        self.task, self.limit = task, limit
        self.kept: list[tuple[float, dict[str, torch.Tensor], dict[str, np.ndarray]]] = []

    def offer(self, inputs: dict[str, torch.Tensor], results: dict[str, torch.Tensor]) -> None:
        rows = {name: values.numpy() for name, values in results.items()}
        badness = self.task.mistake_order(rows)
        for i in np.argsort(-np.nan_to_num(badness, nan=-np.inf))[: self.limit]:
            if np.isnan(badness[i]):
                break
            self.kept.append((float(badness[i]), {name: values[i].cpu() for name, values in inputs.items()},
                              {name: values[i] for name, values in rows.items()}))  # fmt: skip
        self.kept = sorted(self.kept, key=lambda kept: -kept[0])[: self.limit]

    def gathered(self) -> list[tuple[float, dict[str, torch.Tensor], dict[str, np.ndarray]]]:
        """The worst of every DDP rank's worst (this rank's outside DDP)."""
        kept = self.kept
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, kept)
            kept = [item for part in parts for item in part]
        return sorted(kept, key=lambda item: -item[0])[: self.limit]


def all_gather_rows(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DDP rank's evaluation rows, concatenated in rank order (shards differ in length);
    `rows` itself outside DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    # A rank whose shard was empty has only an empty `loss`: take the names from every rank.
    names = dict.fromkeys(name for part in gathered for name in part)
    return {name: torch.cat([part[name] for part in gathered if name in part]) for name in names}
