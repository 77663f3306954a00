"""`strategy.name: auto` on the driver: the candidates race on the user's data, then the winner
trains to the end from its own checkpoint (finetune/strategies/auto.py plans the race).

Each rung is one Ray Tune run over the candidates still in: every trial fits the candidate's
own Ray Train run (named after it), which pauses itself once the rung's epoch is checkpointed
(Tune's own stop would land a report late, after the next epoch's checkpoint). The next rung's
trial of a candidate fits the same Train run, which continues from its latest checkpoint on the
same learning-rate schedule, as if never stopped. Rungs are synchronous on purpose: on
a machine that runs one trial at a time, Tune's asynchronous ASHA compares each trial only with
those before it, so the first one always trains to the end.

RUN_DIR/
  race/train/<run>-<candidate>/   each candidate's Ray Train run and checkpoints
  race/rung-<k>/                  Ray Tune's experiment of rung k
  race/trials/<candidate>/        each candidate's metrics.jsonl
  race.json, race.md              every candidate's scores by rung, cost and outcome; the winner and why
  best.yaml                       the pipeline with the winner's strategy and learning rate fixed
  ...                             then the winner's run, as `finetune train` leaves it
"""

from __future__ import annotations

import copy
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import ray
import yaml
from ray import tune
from rich.console import Console
from rich.table import Table

from finetune import config as config_module
from finetune import files
from finetune.checks import meta_training, race_plan
from finetune.config import PipelineConfig, metric_mode
from finetune.ray_env import check_shared_storage, cluster_nodes, ensure_ray, quiet_ray_data
from finetune.report.progress import working
from finetune.report.sweep import history
from finetune.strategies.auto import SCREEN, Candidate, RacePlan, pipeline_lr, promote
from finetune.training import Interrupted
from finetune.training.trainer import pipeline_datasets, plan_epoch
from finetune.tuning.slots import ReleaseTrialSlot, create_slots, wait_for_slot
from finetune.tuning.sweep import TRIAL_ACTOR_CPUS, train_trial

RACE_DIR = "race"


@dataclass
class Entry:
    """One candidate's part in the race."""

    candidate: Candidate
    trainable_params: int
    total_params: int
    scores: dict[int, float] = field(default_factory=dict)  # rung epoch -> validation metric
    epoch_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    outcome: str = ""  # winner, out at epoch N, below the probe at epoch N, errored: ...

    @property
    def last(self) -> tuple[int, float] | None:
        return max(self.scores.items()) if self.scores else None


@dataclass
class Race:
    metric: str
    mode: str
    plan: RacePlan
    entries: dict[str, Entry]
    names: dict[str, str]  # candidate id -> its Ray Train run's name
    storage_path: str
    winner: str | None = None
    wall_s: float = 0.0  # the race's own seconds, before the winner's run
    margin_over_full: str | None = None
    cheaper_runner_up: str | None = None

    @property
    def racing_rungs(self) -> list[int]:
        """The rungs the race runs: all but the last, the winner's own run to train.epochs
        (a one-rung race runs that one: every candidate trains all epochs)."""
        return self.plan.rungs[:-1] if len(self.plan.rungs) > 1 else self.plan.rungs

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "mode": self.mode, "winner": self.winner, "wall_s": round(self.wall_s, 1),
            "winner_strategy": self.entries[self.winner].candidate.strategy if self.winner else None,
            "winner_lr": self.entries[self.winner].candidate.lr if self.winner else None,
            "margin_over_full": self.margin_over_full, "cheaper_runner_up": self.cheaper_runner_up,
            "rungs": self.plan.rungs, "survivors": self.plan.survivors, "budget_epochs": self.plan.budget_epochs,
            "planned_epochs": self.plan.planned_epochs, "left_out": self.plan.left_out,
            "candidate_epochs": sum(len(e.epoch_seconds) for e in self.entries.values()),
            "racing_rungs": self.racing_rungs,
            # best first: furthest rung, then the score there
            "candidates": [{"id": e.candidate.id, "label": e.candidate.label, **asdict(e),
                            "scores": {str(k): v for k, v in e.scores.items()}} for e in ranked_entries(self)],  # fmt: skip
        }


def candidate_raw(base_raw: dict, candidate: Candidate) -> dict:
    """The pipeline a candidate trains: the user's, with its strategy and learning rate."""
    raw = copy.deepcopy(base_raw)
    raw.pop("tune", None)
    raw["strategy"] = dict(candidate.strategy)
    raw.setdefault("optim", {})["lr"] = candidate.lr
    return raw


def run_candidate(params: dict, raws: dict[str, dict], names: dict[str, str], storage_path: str, race_dir: str,
                  rung: int) -> None:  # fmt: skip
    """One candidate up to the rung's epoch, in a Tune actor; no trackers: the race's record is
    race.json, the winner's run is tracked as any run."""
    cid = params["candidate"]
    wait_for_slot(tune.get_context().get_trial_id())
    train_trial(config_module.parse(raws[cid]), names[cid], storage_path, Path(race_dir) / "trials" / cid,
                tracking=None, pause_after_epochs=rung)  # fmt: skip


def fitted_reservation(cfg: PipelineConfig, total_cpus: float) -> float | None:
    """scaling.cpus_per_worker for the candidates where the trial's own actor would leave Ray Data
    less than the one CPU each of its tasks needs (one worker of 1 CPU on 2 cores: the demo),
    else None. A reservation only places workers; their torch threads follow the node's cores."""
    workers = cfg.scaling.num_workers
    reserved = workers * cfg.scaling.cpus_per_worker
    if total_cpus >= reserved + TRIAL_ACTOR_CPUS + 1 or total_cpus < reserved + 1:
        return None  # room enough, or the pipeline alone starves Ray Data (validate-time warning)
    fitted = math.floor((total_cpus - 1 - TRIAL_ACTOR_CPUS) / workers * 100) / 100
    return fitted if fitted > 0 else None


def _concurrency(cfg: PipelineConfig) -> int:
    """Candidates at a time: what the cluster's CPUs hold beside one CPU for Ray Data per trial."""
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def _entry(candidate: Candidate, raw: dict) -> Entry:
    training = meta_training(config_module.parse(raw))
    if training is None:
        return Entry(candidate, 0, 0)
    updated = sum(p.numel() for g in training.param_groups for p in g["params"])
    return Entry(candidate, updated, sum(p.numel() for p in training.module.parameters()))


class CandidateEpochs(tune.Callback):
    """Each candidate's epoch as Tune receives it: the race's progress, one line each. Holds plain
    values only (Tune saves its callbacks with the experiment)."""

    def __init__(self, labels: dict[str, str], metric: str):
        self.labels, self.metric = labels, metric

    def on_trial_result(self, iteration, trials, trial, result, **info):
        cid = (trial.config or {}).get("candidate")
        if cid in self.labels and "epochs_done" in result and self.metric in result:
            Console().print(f"  {self.labels[cid]}: epoch {int(result['epochs_done'])}, {self.metric} "
                            f"{result[self.metric]:.4f}, {result.get('train/seconds', 0):.0f} s of training",
                            highlight=False, soft_wrap=True)  # fmt: skip


def _run_rung(race: Race, raws: dict[str, dict], race_dir: Path, rung_index: int, alive: list[str], concurrency: int):
    rung = race.plan.rungs[rung_index]
    trainable = tune.with_parameters(run_candidate, raws=raws, names=race.names, storage_path=race.storage_path,
                                     race_dir=str(race_dir), rung=rung)  # fmt: skip
    labels = {cid: race.entries[cid].candidate.label for cid in alive}
    slots = create_slots(concurrency)
    try:
        results = tune.Tuner(
            tune.with_resources(trainable, {"CPU": TRIAL_ACTOR_CPUS}),
            param_space={"candidate": tune.grid_search(alive)},
            tune_config=tune.TuneConfig(search_alg=tune.search.BasicVariantGenerator(max_concurrent=concurrency)),
            run_config=tune.RunConfig(name=f"rung-{rung_index}", storage_path=str(race_dir), verbose=0,
                                      callbacks=[ReleaseTrialSlot(), CandidateEpochs(labels, race.metric)]),  # fmt: skip
        ).fit()
    except KeyboardInterrupt:
        raise Interrupted("the strategy race stopped (a race does not resume: run the command again)") from None
    finally:
        ray.kill(slots)
    # after Ctrl-C Tune saves its state and stops the trials, and calls them TERMINATED like finished ones
    saved = tune.ExperimentAnalysis(str(race_dir / f"rung-{rung_index}")).trials
    if any(trial.status not in ("TERMINATED", "ERROR") for trial in saved):
        raise Interrupted("the strategy race stopped (a race does not resume: run the command again)")
    for result in results:
        cid = (result.config or {}).get("candidate")
        if cid not in race.entries:
            continue
        entry = race.entries[cid]
        reports = history(result)
        epochs = reports[reports["epochs_done"].notna()] if "epochs_done" in reports else reports.iloc[0:0]
        for _, row in epochs.iterrows():
            entry.epoch_seconds.append(float(row["train/seconds"]))
            entry.peak_memory_mb = max(entry.peak_memory_mb or 0.0, float(row.get("train/peak_memory_mb", 0.0) or 0.0))
            if int(row["epochs_done"]) == rung and race.metric in row:
                entry.scores[rung] = float(row[race.metric])
        if result.error is not None:
            entry.outcome = f"errored: {str(result.error).splitlines()[0][:200]}"


def _points(metric: str, difference: float) -> str:
    if metric_mode(metric) == "max":
        return f"{abs(difference) * 100:.1f} points"
    return f"{abs(difference):.4g}"


def _explain(race: Race) -> None:
    """The winner's margin over full fine-tuning and the best runner-up that trains fewer weights,
    each compared at the last rung both reached."""
    winner = race.entries[race.winner]
    better = (lambda a, b: a > b) if race.mode == "max" else (lambda a, b: a < b)

    def compare(other: Entry) -> tuple[int, float] | None:
        common = sorted(set(other.scores) & set(winner.scores))
        return (common[-1], winner.scores[common[-1]] - other.scores[common[-1]]) if common else None

    fulls = [e for e in race.entries.values() if e.candidate.strategy["name"] == "full" and e is not winner]
    if winner.candidate.strategy["name"] == "full":
        race.margin_over_full = "the winner is full fine-tuning"
    elif fulls and (best_full := max(fulls, key=lambda e: (e.last or (0, 0))[0])) and (found := compare(best_full)):
        epoch, gap = found
        word = "level with" if gap == 0 else "ahead of" if (gap > 0) == (race.mode == "max") else "behind"
        race.margin_over_full = f"{_points(race.metric, gap) + ' ' if gap else ''}{word} {best_full.candidate.label} at epoch {epoch}"
    else:
        race.margin_over_full = "full fine-tuning was not among the candidates"
    cheaper = [e for e in race.entries.values()
               if e is not winner and e.scores and 0 < e.trainable_params < winner.trainable_params]  # fmt: skip
    ranked = sorted(((compare(e), e) for e in cheaper if compare(e)), key=lambda item: abs(item[0][1]))
    if ranked:
        (epoch, gap), entry = ranked[0]
        share = entry.trainable_params / max(entry.total_params, 1) * 100
        where = "behind" if better(winner.scores[epoch], entry.scores[epoch]) else "level" if gap == 0 else "ahead"
        race.cheaper_runner_up = (f"{entry.candidate.label}: {_points(race.metric, gap)} {where} at epoch {epoch} "
                                  f"with {share:.1f}% of the weights training")  # fmt: skip


def _rows(race: Race) -> tuple[list[str], list[list[str]]]:
    """The race table's headers and cells, best first: what the console and race.md show."""
    rungs = race.racing_rungs
    headers = ["candidate", *(f"epoch {r}" for r in rungs), "trainable params", "s/epoch", "peak MB", "outcome"]
    rows = []
    for entry in ranked_entries(race):
        seconds = sum(entry.epoch_seconds) / len(entry.epoch_seconds) if entry.epoch_seconds else None
        share = entry.trainable_params / max(entry.total_params, 1) * 100
        rows.append([
            entry.candidate.label, *(f"{entry.scores[r]:.4f}" if r in entry.scores else "" for r in rungs),
            f"{entry.trainable_params:,} ({share:.1f}%)" if entry.total_params else "?",
            f"{seconds:.1f}" if seconds is not None else "", f"{entry.peak_memory_mb:.0f}" if entry.peak_memory_mb else "",
            entry.outcome,
        ])  # fmt: skip
    return headers, rows


def table(race: Race) -> Table:
    rich_table = Table(title=f"strategy race on {race.metric} (validation), best first")
    headers, rows = _rows(race)
    for column in headers:
        rich_table.add_column(column, justify="left" if column in ("candidate", "outcome") else "right")
    for row in rows:
        rich_table.add_row(*row)
    return rich_table


def ranked_entries(race: Race) -> list[Entry]:
    """Furthest rung first, then by score there."""
    sign = -1 if race.mode == "max" else 1

    def key(entry: Entry):
        last = entry.last
        return (0, 0.0) if last is None else (-last[0], sign * last[1])

    return sorted(race.entries.values(), key=key)


def markdown(race: Race) -> str:
    rungs = race.racing_rungs
    lines = [f"# Strategy race ({race.metric}, validation)", "",
             f"Winner: **{race.entries[race.winner].candidate.label}**; {race.margin_over_full}."]  # fmt: skip
    if race.cheaper_runner_up:
        lines.append(f"Runner-up that costs less: {race.cheaper_runner_up}.")
    headers, rows = _rows(race)
    lines += ["", "| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if race.plan.left_out:
        lines += ["", f"Left out by the budget: {', '.join(race.plan.left_out)}."]
    if race.plan.rungs[-1] > rungs[-1]:
        lines += ["", f"The winner then trains on from its epoch-{rungs[-1]} checkpoint to epoch {race.plan.rungs[-1]}: "
                  "`finetune train` does (its run is this folder's metrics.jsonl and summary.json), "
                  "`finetune advise` leaves it to `finetune train best.yaml`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_race(cfg: PipelineConfig, base_raw: dict, run_dir: Path, console: Console, *, to_the_end: bool) -> Race:
    """Race the candidates of `cfg.strategy` (auto). `to_the_end`: leave the last rung (the
    winner's training to train.epochs) to the caller; otherwise stop once one is left."""
    started = time.time()
    ensure_ray(trials=True)
    quiet_ray_data()
    metric = cfg.checkpoint.metric
    mode = metric_mode(metric)
    with working(console, "reading the data to plan the strategy race"):
        datasets = pipeline_datasets(cfg)
        _, steps_per_epoch = plan_epoch(cfg, datasets.training_rows)
        if datasets.bad_row_log is not None:
            ray.kill(datasets.bad_row_log)
    plan = race_plan(cfg, pipeline_lr(base_raw), steps_per_epoch)
    race_dir = run_dir / RACE_DIR
    race_dir.mkdir(parents=True, exist_ok=True)
    storage_path = cfg.checkpoint.storage_path or str(race_dir / "train")
    check_shared_storage(storage_path, cfg.checkpoint.storage_is_shared, cluster_nodes())
    prefix = f"{run_dir.name}-{uuid.uuid4().hex[:6]}"
    trial_raw = config_module.with_absolute_paths(base_raw)  # the trials do not run where the command did
    raws = {c.id: candidate_raw(trial_raw, c) for c in plan.candidates}
    if (fitted := fitted_reservation(cfg, ray.cluster_resources().get("CPU", 0.0))) is not None:
        for raw in raws.values():
            raw.setdefault("scaling", {})["cpus_per_worker"] = fitted
        console.print(f"candidates reserve {fitted:g} CPU per worker (scaling.cpus_per_worker="
                      f"{cfg.scaling.cpus_per_worker:g}): each race trial's own actor would leave Ray Data no CPU",
                      highlight=False, soft_wrap=True)  # fmt: skip
    race = Race(metric, mode, plan, {c.id: _entry(c, raws[c.id]) for c in plan.candidates},
                {c.id: f"{prefix}-{c.id}" for c in plan.candidates}, storage_path)  # fmt: skip
    concurrency = _concurrency(cfg)
    console.print(
        f"strategy race: {len(plan.candidates)} candidates ({', '.join(c.label for c in plan.candidates)}), rungs at "
        f"epoch {', '.join(map(str, plan.rungs))}, {plan.planned_epochs} candidate-epochs of a budget of "
        f"{plan.budget_epochs:g}, {concurrency} at a time", soft_wrap=True,
    )  # fmt: skip
    alive = [c.id for c in plan.candidates]
    for index, rung in enumerate(race.racing_rungs):
        with working(console, f"racing {len(alive)} candidate(s) to epoch {rung}"):
            _run_rung(race, raws, race_dir, index, alive, concurrency)
        scored = {cid: race.entries[cid].scores[rung] for cid in alive if rung in race.entries[cid].scores}
        if not scored:
            raise RuntimeError(f"no candidate finished epoch {rung} of the strategy race: see {race_dir / 'trials'}")
        screen = scored.get(f"{SCREEN}-1") if index == 0 and cfg.strategy.screen else None
        keep = plan.survivors[index + 1] if index + 1 < len(plan.survivors) else 1
        going_on = promote(scored, keep, mode, screen)
        for cid in alive:
            entry = race.entries[cid]
            if cid in going_on or entry.outcome:
                continue
            below = screen is not None and cid in scored and cid not in promote(scored, len(scored), mode, screen)
            entry.outcome = f"below the probe at epoch {rung}" if below else f"out at epoch {rung}"
        alive = going_on
        console.print(f"epoch {rung}: " + ", ".join(f"{race.entries[c].candidate.label} {s:.4f}"
                                                   for c, s in sorted(scored.items(), key=lambda i: -i[1] if mode == "max" else i[1])),
                      soft_wrap=True)  # fmt: skip
        if len(alive) == 1:
            break
    race.winner = alive[0]
    race.wall_s = time.time() - started
    race.entries[race.winner].outcome = "winner"
    _explain(race)
    _write(race, base_raw, run_dir, console, to_the_end)
    return race


def _write(race: Race, base_raw: dict, run_dir: Path, console: Console, to_the_end: bool) -> None:
    files.write_text(run_dir / "race.json", json.dumps(race.to_json(), indent=2, default=str))
    files.write_text(run_dir / "race.md", markdown(race))
    winner = race.entries[race.winner].candidate
    best_raw = candidate_raw(base_raw, winner)
    header = (f"# strategy.name=auto chose {winner.label} on {race.metric} "
              f"({datetime.now():%Y-%m-%d %H:%M}); the race: {run_dir / 'race.md'}\n")  # fmt: skip
    files.write_text(run_dir / "best.yaml", header + yaml.safe_dump(best_raw, sort_keys=False))
    console.print(table(race))
    console.print(f"winner: {winner.label}; {race.margin_over_full} (the race took {race.wall_s:.0f} s)", soft_wrap=True)
    if race.cheaper_runner_up:
        console.print(f"runner-up that costs less: {race.cheaper_runner_up}", soft_wrap=True)
    if not to_the_end:
        console.print(f"train it: finetune train {run_dir / 'best.yaml'}", soft_wrap=True)


def default_advise_dir(cfg: PipelineConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{cfg.name}-advise-{datetime.now():%Y%m%d-%H%M%S}"


def advise(cfg: PipelineConfig, base_raw: dict, folder: Path, console: Console | None = None) -> dict:
    """`finetune advise`: the race without the winner's final training; returns race.json's content."""
    console = console or Console()
    folder = Path(folder).resolve()
    console.print(f"advice directory: {folder}")
    return run_race(cfg, base_raw, folder, console, to_the_end=False).to_json()


def train_auto(cfg: PipelineConfig, base_raw: dict, run_dir: Path, console: Console | None = None) -> dict:
    """`finetune train` with strategy.name=auto: the race, then the winner continued from its
    checkpoint to train.epochs as a `finetune train` run in RUN_DIR (whose summary names the race)."""
    from finetune.training import driver

    console = console or Console()
    run_dir = Path(run_dir).resolve()
    if (run_dir / "config.yaml").exists() or (run_dir / "race.json").exists():
        raise config_module.ConfigError([f"{run_dir} already holds a run: pick another --run-dir"])
    console.print(f"run directory: {run_dir}")
    race = run_race(cfg, base_raw, run_dir, console, to_the_end=True)
    winner = race.entries[race.winner].candidate
    files.write_text(run_dir / driver.RUN_FILE, json.dumps({"ray_run_name": race.names[race.winner],
                                                            "storage_path": race.storage_path}))  # fmt: skip
    console.print(f"training {winner.label} to epoch {cfg.train.epochs}, from its race checkpoint")
    winner_cfg = config_module.parse(candidate_raw(base_raw, winner))
    return driver.run(winner_cfg, run_dir, console, resume=True, notes={"strategy_race": race.to_json()})
