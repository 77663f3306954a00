"""`strategy.name: auto` measured: its pick against every fixed strategy, and what the race costs.

    .venv/bin/python bench/auto.py                          # every setting of bench/strategies.py, 3 seeds
    .venv/bin/python bench/auto.py --tasks text --sizes 500 --seeds 0
    .venv/bin/python bench/auto.py --report                 # the table, from the results file
    .venv/bin/python bench/auto.py --pipeline pipelines/fashion-folder-small.yaml \\
        --results bench/results/auto_pipeline.jsonl          # through `finetune train`, each fixed strategy beside

Settings mode (the default): bench/strategies.py's settings (MiniLM-L6 on Rotten Tomatoes,
EfficientNet-Lite0 on Fashion-MNIST at 64 px; 500 or 2,000 labelled rows; 3 epochs, batch 32,
linear schedule with 10% warmup, the same seeds). The race runs in this process with the step
code a Ray Train worker runs, and makes its decisions with the code `finetune train` uses
(finetune.strategies.auto: plan_race, promote); candidates score on the validation split (1,000
rows), the winner is trained to the end and tested on the same 1,000 test rows as the fixed
strategies, whose means come from bench/strategies.py's results file. Compute: every
candidate's training and validation seconds against one full fine-tune (3 epochs, validated
each epoch) of the same seed, timed in the same process. Each (task, size, seed) is one JSON
line in --results; lines already there are skipped, so an interrupted run resumes.

Pipeline mode: `finetune train PIPELINE` through Ray with strategy.name=auto and with each fixed
strategy of --strategies (bench/strategies.py's rate and options for --pipeline-task), one seed
(train.seed) after the other; test accuracy and wall time of each run, one JSON line per run in
--results (bench/results/auto_pipeline.jsonl for the command below), resumed like the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import strategies as fixed
from finetune import models
from finetune.config import parse
from finetune.models import batchnorm
from finetune.models.groups import layer_groups
from finetune.strategies.auto import SCREEN, AutoConfig, Candidate, plan_race, promote, rungs_for
from finetune.training import steps
from finetune.training.setup import build_training


def candidate_run(task: str, size: int, candidate: Candidate, seed: int, data, args, heldout: dict | None = None):
    """Trains one candidate epoch by epoch: yields (epochs done, val accuracy, seconds of training
    and validation) after each, then ("test", test accuracy of the final weights) and, given
    `heldout` rows, ("heldout", their accuracy)."""
    train, val, test, num_labels, model_cfg = data
    steps_per_epoch = size // args.batch_size
    torch.manual_seed(seed)
    model = models.build_model(model_cfg, num_labels, fixed.TASKS[task].get("image_size", 224))
    cfg = parse({"data": {"source": "x"}, "model": {"name": "x"}, "strategy": candidate.strategy,
                 "optim": {"lr": candidate.lr}, "schedule": {"name": "linear", "warmup_ratio": 0.1},
                 "train": {"epochs": args.epochs}})  # fmt: skip
    training = build_training(cfg, model, steps_per_epoch)
    strategy = training.strategy
    precision = steps.resolve_precision("auto", torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(args.epochs):
        started = time.perf_counter()
        order = torch.randperm(size, generator=generator)
        steps.train_epoch(
            model, fixed._batches(train, args.batch_size, order), training.optimizer, training.scheduler,
            torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), precision=precision, max_steps=steps_per_epoch,
            max_grad_norm=1.0, penalty=lambda: strategy.penalty(model),
            before_step=lambda step, epoch=epoch: strategy.before_step(epoch, epoch * steps_per_epoch + step, model),
            train_modes=training.train_modes.apply,
        )  # fmt: skip
        tracked = set(batchnorm.batchnorm_layers(model)) - batchnorm.frozen_layers(model)
        if tracked:  # the trained BatchNorm layers' statistics, as the worker loop does before each validation
            batchnorm.recalibrate(model, fixed._batches(train, args.batch_size, torch.randperm(size, generator=generator)),
                                  tracked, lambda batch: steps.forward(model, batch, torch.device("cpu"), precision),
                                  max_batches=16)  # fmt: skip
        score = fixed.accuracy(model, val, num_labels, precision)
        yield epoch + 1, score, time.perf_counter() - started
    yield "test", fixed.accuracy(model, test, num_labels, precision), 0.0
    if heldout is not None:
        yield "heldout", fixed.accuracy(model, heldout, num_labels, precision), 0.0


def race_one(task: str, size: int, seed: int, data, args, heldout: dict | None = None) -> dict:
    """auto's race as `finetune train` runs it, in this process; then one full fine-tune, timed."""
    _, _, _, num_labels, model_cfg = data
    groups = len(layer_groups(models.build_model(model_cfg, num_labels, fixed.TASKS[task].get("image_size", 224))))
    plan = plan_race(AutoConfig(name="auto", budget=args.budget), task, epochs=args.epochs,
                     steps_per_epoch=size // args.batch_size, groups=groups)  # fmt: skip
    runs = {c.id: candidate_run(task, size, c, seed, data, args, heldout) for c in plan.candidates}
    scores: dict[str, dict[int, float]] = {c.id: {} for c in plan.candidates}
    seconds = 0.0
    alive = list(runs)
    racing = plan.rungs[:-1] if len(plan.rungs) > 1 else plan.rungs
    for index, rung in enumerate(racing):
        for cid in alive:
            while not scores[cid] or max(scores[cid]) < rung:
                epoch, score, spent = next(runs[cid])
                scores[cid][epoch] = score
                seconds += spent
        at_rung = {cid: scores[cid][rung] for cid in alive}
        screen = at_rung.get(f"{SCREEN}-1") if index == 0 else None
        keep = plan.survivors[index + 1] if index + 1 < len(plan.survivors) else 1
        alive = promote(at_rung, keep, "max", screen)
    winner = alive[0]
    tested = {}
    for epoch, score, spent in runs[winner]:
        if epoch in ("test", "heldout"):
            tested[epoch] = score
            continue
        scores[winner][epoch] = score
        seconds += spent
    for cid in runs:
        runs[cid].close()
    full_seconds = sum(spent for epoch, _, spent in candidate_run(
        task, size, Candidate("full", {"name": "full"}, fixed.LEARNING_RATES[task]["full"]), seed, data, args)
        if epoch != "test")  # fmt: skip
    label = next(c.label for c in plan.candidates if c.id == winner)
    return {
        "task": task, "size": size, "seed": seed, "epochs": args.epochs, "budget": args.budget, "winner": winner,
        "winner_label": label, "test_accuracy": tested["test"],
        **({"heldout_accuracy": tested["heldout"], "heldout_rows": args.heldout_rows} if heldout is not None else {}),
        "scores": {c: {str(e): s for e, s in v.items()} for c, v in scores.items()},
        "candidates": [c.label for c in plan.candidates], "rungs": plan.rungs, "race_seconds": seconds, "full_seconds": full_seconds,
        "compute_vs_full": seconds / full_seconds,
    }  # fmt: skip


def fixed_means(path: Path, epochs: int, heldout_rows: int = 0) -> dict[tuple[str, str, int], dict[str, tuple]]:
    """bench/strategies.py's accuracy (mean, standard deviation over seeds, seeds) per (split, task,
    size) and strategy, split "test" or "heldout" (given `heldout_rows`: the runs that scored them):
    its table's settings, BatchNorm recalibrated."""
    args = argparse.Namespace(epochs=epochs, lr=None, options=None, eval_split="test", batchnorm="recalibrate",
                              heldout_rows=heldout_rows)  # fmt: skip
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    means: dict[tuple[str, str, int], dict[str, float]] = {}
    for row in fixed.summarise(fixed.comparable(rows, args)):
        for split in ("test", "heldout"):
            if row[f"{split}_accuracy_mean"] is not None:
                means.setdefault((split, row["task"], row["size"]), {})[row["strategy"]] = (
                    row[f"{split}_accuracy_mean"], row[f"{split}_accuracy_std"], row["seeds"])
    return means


def report(rows: list[dict], means: dict) -> list[dict]:
    """Per (task, size) and split scored (test; held-out rows when every run scored them): auto's
    mean against each fixed strategy's."""
    table = []
    for task, size in sorted({(r["task"], r["size"]) for r in rows}):
        runs = [r for r in rows if (r["task"], r["size"]) == (task, size)]
        for split in ("test", "heldout"):
            accuracies = [r.get(f"{split}_accuracy") for r in runs]
            setting = means.get((split, task, size), {})
            if None in accuracies or not setting:
                continue
            best_name = max(setting, key=lambda name: setting[name][0])
            best, best_sd, best_seeds = setting[best_name]
            auto_mean = statistics.mean(accuracies)
            # the difference of two means over seeds: its standard error from each side's spread
            # between seeds (training runs differ by more than the rows they are scored on)
            spread = (statistics.variance(accuracies) / len(runs) + (best_sd or 0.0) ** 2 / best_seeds) ** 0.5 \
                if len(runs) > 1 else None
            table.append({
                "task": task, "size": size, "split": split, "seeds": len(runs), "auto_accuracy": round(auto_mean, 4),
                "picks": [r["winner_label"] for r in runs],
                "best_fixed": best_name, "best_fixed_accuracy": best, "full_accuracy": setting.get("full", (None,))[0],
                "auto_minus_best_fixed_points": round((auto_mean - best) * 100, 2),
                "auto_minus_best_fixed_se_points": round(spread * 100, 2) if spread is not None else None,
                "auto_minus_full_points": round((auto_mean - setting["full"][0]) * 100, 2) if "full" in setting else None,
                "compute_vs_full": round(statistics.mean(r["compute_vs_full"] for r in runs), 2),
            })  # fmt: skip
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| task | labelled | scored on | seeds | auto's picks | auto acc | best fixed (mean) | auto - best (± SE) | auto - full | compute x full |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in table:
        vs_full = f"{row['auto_minus_full_points']:+.1f}" if row["auto_minus_full_points"] is not None else ""
        se = f" ± {row['auto_minus_best_fixed_se_points']:.1f}" if row["auto_minus_best_fixed_se_points"] is not None else ""
        lines.append(f"| {row['task']} | {row['size']} | {row['split']} | {row['seeds']} | {'; '.join(row['picks'])} | "
                     f"{row['auto_accuracy']:.3f} | {row['best_fixed']} {row['best_fixed_accuracy']} | "
                     f"{row['auto_minus_best_fixed_points']:+.1f}{se} | {vs_full} | {row['compute_vs_full']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def _run_cli(pipeline: str, overrides: list[str], run_dir: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", "train", pipeline, *overrides, "--run-dir", str(run_dir)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    race = summary.get("strategy_race") or {}
    # training_s: the run's own epochs (their first-batch waits apart, as phases_s counts them) and, for
    # auto, every race candidate's epochs, whose train/seconds include those waits: an upper bound there
    race_training_s = sum(sum(c["epoch_seconds"]) for c in race.get("candidates", []))
    return {"wall_s": time.perf_counter() - started, "test_accuracy": summary.get("test_accuracy"),
            "picked": race.get("winner"), "best_epoch": summary.get("best_epoch"),
            "training_s": summary["phases_s"]["training"] + race_training_s,
            "candidate_epochs": race.get("candidate_epochs"), "epochs_run": summary.get("epochs_run")}  # fmt: skip


def fixed_overrides(task: str, strategy_name: str) -> list[str]:
    """`finetune train` overrides for one fixed strategy at bench/strategies.py's rate and options for `task`."""
    lr = fixed.LEARNING_RATES[task][strategy_name]
    section = dict(fixed.STRATEGIES[strategy_name])
    if strategy_name == "lp_ft":  # the probe at linear_probe's rate, as bench/strategies.py runs it
        section["probe_lr_scale"] = fixed.probe_lr_scale(task, lr)
    return [f"optim.lr={lr}", *(f"strategy.{key}={value}" for key, value in section.items())]


def pipeline_mode(args) -> None:
    """`finetune train PIPELINE` with strategy.name=auto and with each fixed strategy of --strategies,
    for each seed (train.seed), one JSON line per run in --results (resumed); then the table."""
    results, done = Path(args.results), pipeline_rows(args)
    finished = {(r["strategy"], r["seed"]) for r in done}
    for seed in args.seeds:
        for name in ["auto", *args.strategies]:
            if (name, seed) in finished:
                continue
            overrides = ["strategy.name=auto"] if name == "auto" else fixed_overrides(args.pipeline_task, name)
            with tempfile.TemporaryDirectory() as directory:
                run = _run_cli(args.pipeline, [*overrides, f"train.seed={seed}"], Path(directory) / "run")
            row = {"pipeline": args.pipeline, "strategy": name, "seed": seed, "overrides": overrides, **run}
            print(json.dumps(row), flush=True)
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            done.append(row)
    print(pipeline_markdown(done))


def pipeline_rows(args) -> list[dict]:
    """--results' runs of --pipeline."""
    results = Path(args.results)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return [r for r in rows if r.get("pipeline") == args.pipeline]


def pipeline_markdown(rows: list[dict]) -> str:
    """Each strategy's test accuracy (auto's with its picks) and wall time, best mean first."""
    by_strategy: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_strategy.setdefault(row["strategy"], {})[row["seed"]] = row  # the latest of each
    lines = ["| strategy | test accuracy (mean) | each seed | wall s (mean) | auto's picks (candidate epochs) |",
             "|---|---|---|---|---|"]  # fmt: skip
    means = {name: statistics.mean(r["test_accuracy"] for r in seeds.values()) for name, seeds in by_strategy.items()}
    for name in sorted(means, key=lambda n: -means[n]):
        runs = [by_strategy[name][seed] for seed in sorted(by_strategy[name])]
        each = ", ".join(f"{r['test_accuracy']:.3f}" for r in runs)
        picks = " / ".join(f"{r['picked']} ({r['candidate_epochs']})" for r in runs) if name == "auto" else ""
        wall = statistics.mean(r["wall_s"] for r in runs)
        lines.append(f"| {name} | {means[name]:.3f} | {each} | {wall:.0f} | {picks} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(fixed.TASKS), choices=list(fixed.TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[500, 2000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--results", default="bench/results/auto.jsonl")
    parser.add_argument("--fixed-results", default="bench/results/strategies.jsonl")
    parser.add_argument("--heldout-rows", type=int, default=0,
                        help="also score each pick on this many training-split rows no run trains on (bench/strategies.py's)")
    parser.add_argument("--report", action="store_true", help="print the table of --results and stop")
    parser.add_argument("--pipeline", help="pipeline mode: auto against each fixed strategy through `finetune train`")
    parser.add_argument("--pipeline-task", default="image", choices=list(fixed.TASKS),
                        help="pipeline mode: whose rates and options (bench/strategies.py's) the fixed strategies take")
    parser.add_argument("--strategies", nargs="+", default=list(fixed.STRATEGIES), choices=list(fixed.STRATEGIES),
                        help="pipeline mode: the fixed strategies run beside auto (default: all of them)")
    args = parser.parse_args()
    if args.pipeline:
        return print(pipeline_markdown(pipeline_rows(args))) if args.report else pipeline_mode(args)
    results, means = Path(args.results), fixed_means(Path(args.fixed_results), args.epochs, args.heldout_rows)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    # rows of another plan are history (before rungs at every epoch of a short run: [1, 3])
    rungs = rungs_for(args.epochs, AutoConfig(name="auto").reduction_factor)
    done = [r for r in done if (r["epochs"], r["budget"], r.get("rungs", [1, 3])) == (args.epochs, args.budget, rungs)]
    if args.heldout_rows:  # picks not scored on the held-out rows: race again
        done = [r for r in done if r.get("heldout_rows") == args.heldout_rows]
    done = list({(r["task"], r["size"], r["seed"]): r for r in done}.values())  # the latest of each
    if args.report:
        print(markdown(report(done, means)))
        return
    import ray

    ray.init(log_to_driver=False, logging_level="WARNING", include_dashboard=False)  # the datasets are read with Ray Data
    ray.data.DataContext.get_current().enable_progress_bars = False
    results.parent.mkdir(parents=True, exist_ok=True)
    finished = {(r["task"], r["size"], r["seed"]) for r in done}
    for task in args.tasks:
        for size in args.sizes:
            data, heldout = None, fixed.heldout_data(task, args.heldout_rows)
            for seed in args.seeds:
                if (task, size, seed) in finished:
                    continue
                if data is None:
                    train, val, num_labels, model_cfg = fixed._task_data(task, size, "val")
                    _, test, _, _ = fixed._task_data(task, size, "test")
                    data = (train, val, test, num_labels, model_cfg)
                row = race_one(task, size, seed, data, args, heldout)
                print(json.dumps(row), flush=True)
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                done.append(row)
    ray.shutdown()
    print(json.dumps(report(done, means)))


if __name__ == "__main__":
    main()
