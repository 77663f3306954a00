"""`finetune tune` on the driver: a Ray Tune sweep whose trials are `finetune train` runs.

Each trial is a Tune function trainable that builds the same TorchTrainer as `finetune train`
(`training.trainer.build_trainer`) and fits it with Ray Train's `TuneReportCallback`, the Train V2 /
Tune integration: every epoch's report reaches Tune, and ASHA stops a trailing trial at a
rung. A trial's Train run is named after the trial and stored under the sweep directory, so a
resumed sweep continues an interrupted trial from its latest checkpoint.

SWEEP_DIR/
  pipeline.yaml   the pipeline as given (overrides applied): what --resume reruns
  sweep/          Ray Tune's experiment (trial results, searcher and scheduler state)
  train/<trial>/  each trial's Ray Train run and checkpoints
  trials/<trial>/ each trial's metrics.jsonl, TensorBoard files and tracker state (tracking section)
  results.csv     one row per trial
  report.html     the winner, every trial's curve, the searched values against the metric, ASHA's stops
  best/           the best trial's best checkpoint (a saved model: evaluate/predict/export)
  best.yaml       the pipeline with the best values, for `finetune train` as is
  config.yaml     best.yaml resolved: with best/, `finetune evaluate|predict SWEEP_DIR` work
  summary.json
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import ray
import yaml
from ray import tune
from rich.console import Console

from finetune import config as config_module
from finetune import files
from finetune.config import AshaConfig, PipelineConfig
from finetune.inference import evaluate_run
from finetune.report import report_or_warn
from finetune.report.model_card import write_model_card
from finetune.report.progress import working
from finetune.report.sweep import history, results_table, trial_id
from finetune.ray_env import (
    check_shared_storage, cluster_nodes, ensure_ray, on_driver_node, quiet_ray_data, warn_if_data_starved,
)  # fmt: skip
from finetune.training import Interrupted
from finetune.tracking import SweepTracking, start_tracking
from finetune.training.driver import fit_and_record
from finetune.training.monitor import EventsHandled, RunMonitor
from finetune.training.record import RunRecord
from finetune.training.trainer import build_trainer, export_checkpoint, pipeline_datasets, plan_epoch
from finetune.tuning.slots import ReleaseTrialSlot, create_slots, wait_for_slot
from finetune.tuning.space import param_space, trial_config, trial_count, trial_raw, used_params

EXPERIMENT = "sweep"
TIME_ATTRS = {"epochs": "epochs_done", "steps": "steps_done"}
# The trial's own actor only waits on its TorchTrainer; the workers reserve the CPUs (Tune
# refuses 0, and a whole CPU per waiting trial would starve the workers on a small machine).
TRIAL_ACTOR_CPUS = 0.01


def default_sweep_dir(cfg: PipelineConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{cfg.name}-sweep-{datetime.now():%Y%m%d-%H%M%S}"


def run_trial(params: dict, base_raw: dict, sweep_dir: str, tracking: dict) -> None:
    """One trial (runs in a Tune actor): the trial's pipeline through the `finetune train` path,
    this actor being its driver: the workers' events come to it, and its trackers log them as a
    run of the sweep's (`tracking`: SweepTracking.for_trials)."""
    trial_id = tune.get_context().get_trial_id()
    wait_for_slot(trial_id)
    train_trial(trial_config(base_raw, params), trial_id, str(Path(sweep_dir) / "train"),
                Path(sweep_dir) / "trials" / trial_id, tracking, params=params)  # fmt: skip


def train_trial(cfg: PipelineConfig, name: str, storage_path: str, trial_dir: Path, tracking: dict | None,
                params: dict | None = None, pause_after_epochs: int | None = None) -> None:  # fmt: skip
    """Fit the Ray Train run `name` under `storage_path` (continuing it from its latest checkpoint
    if it exists) from inside a Tune trial: every epoch's report reaches Tune; the events go to
    trial_dir/metrics.jsonl and to the trackers (`tracking`: the sweep's, None for none);
    `pause_after_epochs`: the run stops itself there (a race's rung)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_ray_data()
    datasets = pipeline_datasets(cfg)
    batches_per_epoch, _ = plan_epoch(cfg, datasets.training_rows)
    monitor = RunMonitor.options(scheduling_strategy=on_driver_node()).remote()  # owned by this actor: ends with it
    trainer = build_trainer(
        cfg, datasets, batches_per_epoch, name=name, monitor=monitor, storage_path=storage_path,
        # Tune may stop this actor once it sees a report: the events before each report are handled first
        callbacks=(EventsHandled(monitor), TuneReportCallback()), pause_after_epochs=pause_after_epochs,
    )  # fmt: skip
    trial_dir.mkdir(parents=True, exist_ok=True)  # a resumed trial continues its tracker runs
    trackers = start_tracking(cfg, trial_dir, resume=True, sweep=tracking) if tracking is not None else None
    record = RunRecord(trial_dir / "metrics.jsonl")
    try:
        fit_and_record(trainer, monitor, record, [trackers] if trackers is not None else [])
    except BaseException as error:
        if trackers is not None:
            trackers.fail(interrupted=isinstance(error, KeyboardInterrupt))
        raise
    finally:
        ray.kill(monitor)
        if datasets.bad_row_log is not None:
            ray.kill(datasets.bad_row_log)
    if trackers is not None:
        tested = record.final.metrics if record.final else {}
        trackers.finish({"trial": name, "params": params, **{k.replace("/", "_"): v for k, v in tested.items()}}, None)


def _trainable(base_raw: dict, sweep_dir: Path, tracking: SweepTracking):
    # the trials do not run where the command did: relative paths made absolute here
    trainable = tune.with_parameters(run_trial, base_raw=config_module.with_absolute_paths(base_raw),
                                     sweep_dir=str(sweep_dir), tracking=tracking.for_trials())  # fmt: skip
    return tune.with_resources(trainable, {"CPU": TRIAL_ACTOR_CPUS})


def _scheduler(cfg: PipelineConfig):
    scheduler = cfg.tune.scheduler
    if not isinstance(scheduler, AshaConfig):
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(
        time_attr=TIME_ATTRS[scheduler.time_attr],
        max_t=scheduler.max_t or cfg.train.epochs,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def _search_alg(cfg: PipelineConfig):
    seed = cfg.tune.seed
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    if cfg.tune.search_alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed)
    # random/grid: Tune's own generator, which limits concurrency itself
    return tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=cfg.tune.max_concurrent_trials)


def _tuner(cfg: PipelineConfig, base_raw: dict, sweep_dir: Path, tracking: SweepTracking) -> tune.Tuner:
    metric, mode = cfg.tune.metric, cfg.tune.mode
    return tune.Tuner(
        _trainable(base_raw, sweep_dir, tracking),
        param_space=param_space(cfg.tune),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, scheduler=_scheduler(cfg), search_alg=_search_alg(cfg),
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=None if cfg.tune.search_alg == "random" else cfg.tune.max_concurrent_trials,
            time_budget_s=cfg.tune.time_budget_s,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(sweep_dir), verbose=1, callbacks=[ReleaseTrialSlot()],
        ),  # fmt: skip
    )


def _fit(tuner: tune.Tuner, cfg: PipelineConfig, sweep_dir: Path, tracking: SweepTracking):
    """The sweep's results; Interrupted after Ctrl-C (Tune saves its state on the first one and
    returns with trials unfinished; a second one raises KeyboardInterrupt)."""
    slots = create_slots(cfg.tune.max_concurrent_trials)
    resume = f"continue with: finetune tune --resume {sweep_dir}"
    try:
        results = tuner.fit()
    except BaseException as error:
        tracking.fail(interrupted=isinstance(error, KeyboardInterrupt))
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"the sweep stopped; {resume}") from None
        raise
    finally:
        ray.kill(slots)
    # The saved state, as --resume reads it: after Ctrl-C Tune saves it, then stops the running
    # trials, and the results it returns call those TERMINATED like the finished ones.
    saved = tune.ExperimentAnalysis(str(sweep_dir / EXPERIMENT)).trials
    if unfinished := sum(trial.status not in ("TERMINATED", "ERROR") for trial in saved):
        tracking.fail(interrupted=True)
        raise Interrupted(f"the sweep stopped with {unfinished} trial(s) unfinished; {resume}")
    return results


def sweep(cfg: PipelineConfig, base_raw: dict, sweep_dir: Path, console: Console | None = None) -> dict:
    """Run the pipeline's `tune` section; returns the summary also written to SWEEP_DIR/summary.json."""
    console = console or Console()
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray(trials=True)
    # the trials' checkpoints and Tune's state live in the sweep folder: every node writes there
    check_shared_storage(str(sweep_dir), cfg.checkpoint.storage_is_shared, cluster_nodes())
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRIAL_ACTOR_CPUS
    warn_if_data_starved(cfg.tune.max_concurrent_trials * per_trial, console)
    files.write_text(sweep_dir / "pipeline.yaml", yaml.safe_dump(base_raw, sort_keys=False))
    console.print(f"sweep directory: {sweep_dir}\n{trial_count(cfg.tune)} trials, {cfg.tune.max_concurrent_trials} at a time")
    started = time.time()
    tracking = SweepTracking(cfg, sweep_dir, resume=False)
    results = _fit(_tuner(cfg, base_raw, sweep_dir, tracking), cfg, sweep_dir, tracking)
    return _report(cfg, base_raw, sweep_dir, results, time.time() - started, console, tracking)


def resume(sweep_dir: Path, retry_errored: bool = False, console: Console | None = None) -> dict:
    """Continue an interrupted sweep: finished trials stay as they are, unfinished ones continue
    from their latest checkpoint; errored ones run again only with `retry_errored`."""
    console = console or Console()
    sweep_dir = Path(sweep_dir).resolve()
    pipeline = sweep_dir / "pipeline.yaml"
    if not (pipeline.is_file() and (sweep_dir / EXPERIMENT).is_dir()):
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (pipeline.yaml or {EXPERIMENT}/ missing)")
    from finetune.checks import load_pipeline

    cfg = load_pipeline(pipeline)
    base_raw = yaml.safe_load(pipeline.read_text())
    ensure_ray(trials=True)
    started = time.time()
    tracking = SweepTracking(cfg, sweep_dir, resume=True)
    tuner = tune.Tuner.restore(
        str(sweep_dir / EXPERIMENT), _trainable(base_raw, sweep_dir, tracking),
        resume_unfinished=True, resume_errored=retry_errored,
    )  # fmt: skip
    console.print(f"resuming sweep {sweep_dir}")
    results = _fit(tuner, cfg, sweep_dir, tracking)
    return _report(cfg, base_raw, sweep_dir, results, time.time() - started, console, tracking)


def trial_rows(results, base_raw: dict, metric: str, mode: str, keys: list[str]) -> pd.DataFrame:
    """One row per trial: its values, best metric and epoch, epochs run, whether ASHA stopped it."""
    rows = []
    for result in results:
        reports = history(result)
        epochs = reports[reports["epochs_done"].notna()] if "epochs_done" in reports else reports.iloc[0:0]
        params = used_params(base_raw, result.config or {})
        planned = trial_config(base_raw, params).train.epochs
        best = None
        if len(epochs) and metric in epochs:
            # ties go to the later epoch, as in Ray Train's ranking: that checkpoint is the one kept
            latest_first = epochs[metric][::-1]
            best = epochs.loc[latest_first.idxmin() if mode == "min" else latest_first.idxmax()]
        epochs_run = int(epochs["epochs_done"].max()) if len(epochs) else 0
        row = {"trial": trial_id(result)}
        row.update({key: params.get(key) for key in keys})
        row.update({
            "params_json": json.dumps(params),
            f"best {metric}": None if best is None else float(best[metric]),
            "best_epoch": None if best is None else int(best["epochs_done"]),
            "epochs_run": epochs_run,
            "stopped_early": result.error is None and epochs_run < planned,
            "status": "ERROR" if result.error is not None else "TERMINATED",
            "wall_s": float(reports["time_total_s"].max()) if "time_total_s" in reports else None,
            "checkpoint": None if best is None else best.get("checkpoint_path"),
        })  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def _report(cfg: PipelineConfig, base_raw: dict, sweep_dir: Path, results, wall_s: float, console: Console,
            tracking: SweepTracking) -> dict:  # fmt: skip
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = trial_rows(results, base_raw, metric, mode, list(cfg.tune.search_space))
    rows.to_csv(sweep_dir / "results.csv", index=False)
    console.print(results_table(rows, metric))

    summary = {"sweep_dir": str(sweep_dir), "metric": metric, "mode": mode, "trials": len(rows),
               "stopped_early": int(rows["stopped_early"].sum()), "errored": int((rows["status"] == "ERROR").sum()),
               "trial_epochs": int(rows["epochs_run"].sum()), "wall_s": wall_s, "best": None}  # fmt: skip
    finished = rows.dropna(subset=[f"best {metric}"])
    if len(finished):
        best = finished.sort_values(f"best {metric}", ascending=(mode == "min")).iloc[0]
        params = used_params(base_raw, json.loads(best["params_json"]))
        best_raw = trial_raw(base_raw, params)
        best_raw["name"] = f"{config_module.parse(best_raw).name}-best"
        header = f"# best trial {best['trial']} of sweep {sweep_dir}: {metric} = {best[f'best {metric}']:.4f}\n"
        files.write_text(sweep_dir / "best.yaml", header + yaml.safe_dump(best_raw, sort_keys=False))
        # with best/, a run folder: `finetune evaluate|predict SWEEP_DIR` use the best trial's model
        config_module.save(config_module.parse(best_raw), sweep_dir / "config.yaml")
        summary["best"] = {"trial": best["trial"], "params": params, metric: float(best[f"best {metric}"]),
                           "epoch": int(best["best_epoch"]), "pipeline": str(sweep_dir / "best.yaml")}  # fmt: skip
        if isinstance(best["checkpoint"], str):
            export_checkpoint(ray.train.Checkpoint(best["checkpoint"]), sweep_dir / "best")
            # Tested here, once: ASHA ends a trial at max_t before its own test report.
            with working(console, "testing the best trial's model"):
                tested = evaluate_run(sweep_dir, "test")
            summary["best"].update(checkpoint=str(sweep_dir / "best"), **tested)
        tested_metric = "test/" + metric.split("/", 1)[1]
        console.print(
            f"best trial {best['trial']}: {params} -> {metric} {best[f'best {metric}']:.4f}"
            + (f", {tested_metric} {summary['best'][tested_metric]:.4f}" if tested_metric in summary["best"] else "")
        )
        console.print(f"best model: {summary['best'].get('checkpoint')}\nretrain with: finetune train {sweep_dir / 'best.yaml'}")
    summary_text = json.dumps(summary, indent=2, default=str)
    files.write_text(sweep_dir / "summary.json", summary_text)
    if (sweep_dir / "best").is_dir():
        write_model_card(sweep_dir, command=f"finetune train {sweep_dir.name}/best.yaml")
    outcomes = {row.trial: "errored" if row.status == "ERROR" else "stopped_early" if row.stopped_early else "finished"
                for row in rows.itertuples()}  # fmt: skip
    tracking.finish(json.loads(summary_text), sweep_dir / "best", outcomes)  # as summary.json holds it
    report_or_warn(sweep_dir, console)
    return summary
