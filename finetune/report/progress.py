"""Live training progress in the terminal (rich): one bar over all steps, a line per epoch;
a subscriber to the run's events (`training.events.Subscriber`)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from finetune.training.events import (
    Baseline, BatchNormPlan, EpochEnded, LayerGroups, RunEvent, StepProgress, WorkerStarted, WorkProgress,
)  # fmt: skip


class TrainingProgress:
    def __init__(self, console: Console, epochs: int, steps_per_epoch: int):
        self.console = console
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("left"),
            TextColumn("[dim]{task.fields[doing]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=epochs * steps_per_epoch, epoch=1, epochs=epochs, loss="-", speed="-",
            doing="starting the workers",
        )  # fmt: skip

    def __enter__(self) -> "TrainingProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.update(self.task, doing="")
        self.progress.stop()

    def on_step(self, progress: StepProgress) -> None:
        done = progress.epoch * self.steps_per_epoch + progress.step
        self.progress.update(
            self.task,
            completed=done,
            epoch=progress.epoch + 1,
            loss=f"{progress.loss:.4f}",
            speed=f"{progress.samples_per_s:.1f}",
            doing="training",
        )

    def on_work(self, progress: WorkProgress) -> None:
        rows = f": {progress.done:,} rows" if progress.done else ""
        self.progress.update(self.task, doing=f"{progress.what}{rows}")

    def on_event(self, event: RunEvent) -> None:
        if isinstance(event, WorkerStarted):
            self.progress.update(self.task, doing="setting up the model")
        elif isinstance(event, EpochEnded):
            self.progress.update(self.task, doing="saving the checkpoint")
        if isinstance(event, LayerGroups):
            self.console.print(groups_table(event.rows))
        elif isinstance(event, BatchNormPlan):
            self.console.print(event.text, highlight=False, soft_wrap=True)
        elif isinstance(event, Baseline):
            self.console.print(f"baseline (new head only): {_scores(event.metrics, 'baseline_test/', 'test ')}")
        elif isinstance(event, EpochEnded):
            metrics = event.metrics
            # the task's first metric on the fixed training sample, to read beside val's
            train_eval = next((f"train-eval {key.split('/')[1]} {value:.4f}, " for key, value in metrics.items()
                               if key.startswith("train_eval/") and not key.endswith(("/samples", "/loss"))), "")  # fmt: skip
            self.console.print(
                f"epoch {metrics['epoch'] + 1}/{self.epochs}: train loss {metrics['train/loss']:.4f}, {train_eval}"
                f"{_scores(metrics, 'val/', 'val ')}, {metrics['train/samples_per_s']:.1f} samples/s"
            )


@contextmanager
def working(console: Console, what: str):
    """A step that takes a while, named as it starts: a spinner on a terminal, a line in a log."""
    if console.is_terminal:
        with console.status(f"{what} ..."):
            yield
    else:
        console.print(f"{what} ...", highlight=False)
        yield


def _scores(metrics: dict, prefix: str, label: str) -> str:
    """The task's metrics under `prefix` (val/accuracy, val/map, val/rmse, ...), as 'val accuracy 0.9100, ...'."""
    return ", ".join(f"{label}{key[len(prefix):]} {value:.4f}" for key, value in metrics.items()
                     if key.startswith(prefix) and not key.endswith("/samples"))  # fmt: skip


def summary_table(summary: dict) -> Table:
    table = Table(title="finetune summary", show_header=True)
    table.add_column("")
    table.add_column("before (new head only)", justify="right")
    table.add_column("after fine-tuning", justify="right")
    yardstick = any(key.startswith("yardstick_test_") for key in summary)
    if yardstick:  # the cheapest model that could work, on the same rows (finetune/yardstick)
        table.add_column("yardstick", justify="right")
    for key, value in summary.items():
        if key.startswith("test_") and key != "test_samples" and value is not None:
            cells = [summary.get(f"baseline_{key}"), value] + ([summary.get(f"yardstick_{key}")] if yardstick else [])
            table.add_row(key.replace("_", " ", 1), *("" if cell is None else f"{cell:.4f}" for cell in cells))
    table.add_row("best epoch (val)", "", f"{summary['best_epoch'] + 1} of {summary['epochs']}")
    table.add_row("train samples/s", "", f"{summary['train_samples_per_s']:.1f}")
    table.add_row("wall time", "", f"{summary['wall_s']:.0f} s")
    return table


def phases_line(phases_s: dict[str, float]) -> str:
    """Where the wall time went, the phases in run order: what to look at when a run is slow."""
    total = sum(phases_s.values()) or 1.0
    shown = [f"{phase.replace('_', ' ')} {seconds:.1f} s" + (f" ({seconds / total:.0%})" if seconds / total >= 0.2 else "")
             for phase, seconds in phases_s.items() if seconds >= 0.05]  # fmt: skip
    return "time: " + ", ".join(shown)


def groups_table(rows: list[dict]) -> Table:
    """Layer groups input -> output with their learning rate and trainable parameter count."""
    table = Table(title="layer groups (input -> output)")
    for column in ("group", "lr", "params", "trainable now"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in rows:
        lr = "frozen" if row["lr"] is None else f"{row['lr']:.2e}"
        table.add_row(row["group"], lr, f"{row['params']:,}", f"{row['trainable_now']:,}")
    return table
