"""`finetune train` on the driver: data, the Ray Train run, live progress, the run directory,
the summary. What `finetune tune` and `evaluate` reuse lives in training/trainer.py and ray_env.py."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import ray
import ray.train
from rich.console import Console
from rich.markup import escape

from finetune import config as config_module
from finetune import files, yardstick
from finetune.config import ConfigError, PipelineConfig
from finetune.data import token_lengths
from finetune.ray_env import check_shared_storage, cluster_nodes, ensure_ray, on_driver_node, quiet_ray_data, warn_if_data_starved
from finetune.report import report_or_warn, verdict
from finetune.report.model_card import write_model_card
from finetune.report.progress import TrainingProgress, phases_line, summary_table, working
from finetune.tracking import start_tracking
from finetune.training import Interrupted, TrainingDiverged
from finetune.training.events import RunEvent, StepProgress, Subscriber, WorkProgress
from finetune.training.monitor import RunMonitor
from finetune.training.record import RunRecord
from finetune.training.phases import PhaseClock, run_phases
from finetune.training.trainer import best_checkpoint, build_trainer, export_checkpoint, pipeline_datasets, plan_epoch


RUN_FILE = "run.json"  # what ties a run folder to its checkpoints: the Ray Train run's name and storage


def default_run_dir(cfg: PipelineConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


def _run_file(run_dir: Path) -> dict | None:
    record = Path(run_dir) / RUN_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def checkpoint_folder(run_dir: Path) -> Path | None:
    """Where Ray Train keeps this run's checkpoints (None before the run has started)."""
    run = _run_file(run_dir)
    return None if run is None else Path(run["storage_path"], run["ray_run_name"])


def _ray_run(run_dir: Path, storage_path: str, resume: bool) -> tuple[str, str]:
    """(name, storage path) of the run's Ray Train run. Ray Train continues any earlier run of the
    same name and storage, so a new run gets a name of its own: a reused run folder name, a
    deleted and rerun folder, or two runs started in the same second against one storage_path
    never continue each other's checkpoints. --resume reads the run's own."""
    if resume and (run := _run_file(run_dir)):
        return run["ray_run_name"], run["storage_path"]
    if resume:  # a run folder from before run.json: named after the folder
        return run_dir.name, storage_path
    return f"{run_dir.name}-{uuid.uuid4().hex[:8]}", storage_path


def hand_out(item: RunEvent | StepProgress | WorkProgress, record: RunRecord, subscribers: list[Subscriber]) -> None:
    """One item from the workers to the subscribers, and an event into `record`. A resumed run
    resends the epochs before its checkpoint: those the record holds unchanged go to nobody. The
    record keeps an event only after the subscribers had it, so a driver killed between the two
    hands a resent epoch to the trackers again (they skip what they logged: tracking.Tracking)
    rather than leaving it out of their runs."""
    if isinstance(item, StepProgress):
        for subscriber in subscribers:
            subscriber.on_step(item)
    elif isinstance(item, WorkProgress):
        for subscriber in subscribers:
            subscriber.on_work(item)
    elif record.is_new(item):
        for subscriber in subscribers:
            subscriber.on_event(item)
        record.fold(item)


def fit_and_record(trainer, monitor, record: RunRecord, subscribers: list[Subscriber]) -> ray.train.Result:
    """Run fit() in a thread while this one folds the workers' events into `record` and hands
    each new one to the subscribers (the latest step progress too)."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="finetune-fit", daemon=True)
    thread.start()
    seen = 0
    while True:
        finished = not thread.is_alive()
        items = ray.get(monitor.poll.remote(seen))
        for item in items:
            hand_out(item, record, subscribers)
        if items:
            seen += len(items)
            monitor.mark_handled.remote(seen)  # a report waiting on these may go on (monitor.EventsHandled)
        if finished:
            break
        thread.join(timeout=0.5)
    record.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run(cfg: PipelineConfig, run_dir: Path, console: Console | None = None, resume: bool = False,
        notes: dict | None = None) -> dict:  # fmt: skip
    """Fine-tune as configured; returns the summary also written to RUN_DIR/summary.json.
    `resume`: continue the run in `run_dir` from its latest checkpoint (Ray Train restores a run
    of the same name and storage: RUN_DIR/run.json names them). `notes`: added to the summary
    (e.g. the strategy race that chose this run's strategy)."""
    console = console or Console()
    clock = PhaseClock()
    run_dir = Path(run_dir).resolve()
    if not resume and (run_dir / "config.yaml").exists():
        raise ConfigError([f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --run-dir"])
    with clock("ray_start"), working(console, "starting Ray"):
        ensure_ray()
    warn_if_data_starved(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, console)
    ray_name, storage_path = _ray_run(run_dir, cfg.checkpoint.storage_path or str(run_dir / "ray"), resume)
    check_shared_storage(storage_path, cfg.checkpoint.storage_is_shared, cluster_nodes())
    console.print(f"run directory: {run_dir}")
    quiet_ray_data()
    with clock("read_data"), working(console, "reading the data (labels, splits, row counts)"):
        datasets = pipeline_datasets(cfg)
        training_rows = datasets.training_rows  # data.long_text=windows: the windows counted here
        lengths = token_lengths.measure(cfg, datasets.label_names)
    train_rows = datasets.train_rows
    batches_per_epoch, steps_per_epoch = plan_epoch(cfg, training_rows)
    # saved once the data is read: a data error leaves no run behind, so the same command reruns
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / RUN_FILE, json.dumps({"ray_run_name": ray_name, "storage_path": storage_path}))
    config_module.save(cfg, run_dir / "config.yaml")
    console.print(
        f"{train_rows} training rows"
        + (f" ({datasets.train_windows} windows)" if datasets.train_windows is not None else "")
        + f", {len(datasets.label_names)} labels, {cfg.scaling.num_workers} worker(s), {steps_per_epoch} steps/epoch"
    )
    if lengths:
        console.print(token_lengths.describe(lengths), highlight=False, soft_wrap=True)
        if warning := token_lengths.warning(lengths, cfg.data.long_text):
            console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    stick = None
    if cfg.yardstick.enabled:
        with clock("yardstick"), working(console, "fitting the yardstick"):
            try:
                stick = yardstick.fit_and_save(cfg, datasets.label_names, run_dir)
            except Exception as error:  # noqa: BLE001 - a comparison that fails must not cost the run
                console.print(f"[bold yellow]warning:[/] no yardstick: {escape(str(error))}; the run goes on "
                              "without it (yardstick.enabled=false skips it)", highlight=False, soft_wrap=True)  # fmt: skip
        if stick:
            console.print(stick.line(yardstick.metric_name(cfg)), highlight=False, soft_wrap=True)
    monitor = RunMonitor.options(scheduling_strategy=on_driver_node()).remote()
    trainer = build_trainer(cfg, datasets, batches_per_epoch, name=ray_name, storage_path=storage_path, monitor=monitor)

    record = RunRecord(run_dir / "metrics.jsonl")
    with clock("tracking"):
        tracking = start_tracking(cfg, run_dir, resume)
    try:
        with TrainingProgress(console, cfg.train.epochs, steps_per_epoch) as progress:
            fit_started = time.time()
            result = fit_and_record(trainer, monitor, record, [progress, tracking])
            fit_ended = time.time()
        if record.diverged:
            raise TrainingDiverged(record.diverged.step, record.diverged.epoch)
        skipped = datasets.skipped_rows()
    except BaseException as error:
        tracking.fail(interrupted=isinstance(error, KeyboardInterrupt))
        kept = sorted(Path(storage_path, ray_name).glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
        if isinstance(error, KeyboardInterrupt):
            where = f"the last checkpoint is {kept[-1]}" if kept else "no epoch had finished"
            raise Interrupted(f"{where}; continue with: finetune train --resume {run_dir}") from None
        if kept:
            console.print(f"training failed; the last good checkpoint is kept at {kept[-1]}", soft_wrap=True)
        raise
    finally:
        ray.kill(monitor)
        if datasets.bad_row_log is not None:
            ray.kill(datasets.bad_row_log)

    best = best_checkpoint(result, record.best_epoch)
    if best is not None:
        with clock("export"), working(console, "saving the best model"):
            export_checkpoint(best, run_dir / "best")
    wall_s = time.time() - clock.started_at
    phases_s = run_phases(clock, fit_started, fit_ended, record.phases, wall_s)
    summary = record.summary(cfg, train_rows=train_rows, wall_s=wall_s, phases_s=phases_s, run_dir=run_dir,
                             has_best=best is not None, skipped=skipped)  # fmt: skip
    summary["token_lengths"] = lengths
    if datasets.train_windows is not None:
        summary["train_windows"] = datasets.train_windows  # data.long_text=windows: the rows an epoch trains on
    if stick:
        summary.update(stick.summary())
    summary["warnings"] = verdict.check(summary, cfg.checkpoint.metric)
    summary.update(notes or {})
    files.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    if best is not None:
        write_model_card(run_dir)
    tracking.finish(summary, run_dir / "best" if best is not None else None)
    console.print(summary_table(summary))
    console.print(phases_line(summary["phases_s"]), highlight=False, soft_wrap=True)
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
    report_or_warn(run_dir, console)
    return summary


def resume(run_dir: Path, console: Console | None = None) -> dict:
    """Continue a run whose driver died, from its latest checkpoint, with its saved config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (config.yaml missing)")
    console = console or Console()
    console.print(f"resuming {run_dir}")
    return run(config_module.load_saved(run_dir / "config.yaml"), run_dir, console, resume=True)
