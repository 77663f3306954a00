"""Every fine-tuning strategy side by side on both offline tasks, low-data and larger, 3 seeds.

    .venv/bin/python bench/strategies.py                       # everything (about 1.5 h on 2 cores)
    .venv/bin/python bench/strategies.py --tasks text --sizes 500 --seeds 0
    .venv/bin/python bench/strategies.py --tasks image --batchnorm legacy   # BatchNorm as before issue 15

Tasks: MiniLM-L6 on Rotten Tomatoes; EfficientNet-Lite0 on Fashion-MNIST (64 px). Each run
trains `--epochs` epochs on N labelled samples (same samples, order and head init for every
strategy at a given seed) and reports accuracy on the same 1,000 test samples, the number of
parameters the optimizer updates, and wall time. Runs happen in this process with the step
code a Ray Train worker uses (`finetune.training.steps`): strategies are the variable here, Ray's
own cost is bench/overhead.py's subject.

Each finished run is appended to --results as one JSON line; runs already there (same
settings) are skipped, so an interrupted benchmark resumes. The last line printed is one JSON
object (the table).

Settings were chosen on the validation split, never the test split, at 500 samples, seed 0:

    .venv/bin/python bench/strategies.py --eval-split val --sizes 500 --seeds 0 \
        --strategies discriminative --lr 3e-4 --options '{"layer_decay": 0.9}' \
        --results bench/results/strategy_selection.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from finetune import models
from finetune.config import DataConfig, ModelConfig, parse
from finetune.data.sources import load_source
from finetune.models import batchnorm
from finetune.models.groups import layer_groups
from finetune.training import steps
from finetune.training.setup import build_training
from finetune.tasks.classification import Classification

TASKS = {
    "text": {"source": "rotten_tomatoes", "model": "minilm-l6", "max_length": 64},
    "image": {"source": "fashion_mnist", "model": "efficientnet-lite0", "image_size": 64},
}
# Learning rates by what trains: whole networks want small steps, a head or adapters larger ones.
# gradual_unfreeze and discriminative (and lora on images) were picked on the validation split
# (500 samples, seed 0; bench/results/strategy_selection.jsonl); discriminative's lr is the head's.
LEARNING_RATES = {
    "text": {"full": 1e-4, "partial": 1e-4, "gradual_unfreeze": 3e-4, "discriminative": 3e-4, "l2sp": 1e-4,
             "linear_probe": 1e-2, "bitfit": 2e-3, "lora": 1e-3, "lp_ft": 1e-4, "surgical": 1e-4},
    "image": {"full": 1e-3, "partial": 1e-3, "gradual_unfreeze": 1e-3, "discriminative": 3e-3, "l2sp": 1e-3,
              "linear_probe": 1e-2, "bitfit": 5e-3, "lora": 2e-3, "lp_ft": 1e-3, "surgical": 1e-3},
}  # fmt: skip
STRATEGIES = {
    "full": {"name": "full"},
    "linear_probe": {"name": "linear_probe"},
    "partial": {"name": "partial", "freeze_groups": 3},
    # every_steps left out: the bench spreads the unfreezing over the first half of the run.
    "gradual_unfreeze": {"name": "gradual_unfreeze"},
    "discriminative": {"name": "discriminative", "layer_decay": 0.9},
    "l2sp": {"name": "l2sp", "alpha": 0.01, "beta": 0.01},
    "bitfit": {"name": "bitfit"},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    # the probe (one epoch of three) at linear_probe's rate: probe_lr_scale is set per task below
    "lp_ft": {"name": "lp_ft", "probe_epochs": 1},
    "surgical": {"name": "surgical", "last": 2},  # the last block and the neck: new labels, same inputs
}
TEST_SAMPLES = 1000
# --heldout-rows: rows of the training split from here on, which no setting trains on (the
# largest size is 2,000): the same rows for every size, strategy, seed and bench/auto.py's picks
HELDOUT_OFFSET = 2000


def _task_data(task: str, size: int, eval_split: str) -> tuple[dict, dict, int, object]:
    """Preprocessed train (first `size` rows of the seeded split) and evaluation tensors."""
    spec = TASKS[task]
    data_cfg = DataConfig(source=spec["source"], max_length=spec.get("max_length", 128), image_size=spec.get("image_size"))
    model_cfg = ModelConfig(name=spec["model"])
    source = load_source(data_cfg, seed=0)
    preprocessor = models.build_preprocessor(model_cfg, data_cfg)
    tensors = {}
    for split, count in (("train", size), (eval_split, TEST_SAMPLES)):
        rows = source.splits[split].limit(count).take_batch(count, batch_format="numpy")
        tensors[split] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in preprocessor(rows).items()}
    return tensors["train"], tensors[eval_split], len(source.label_names), model_cfg


def heldout_data(task: str, count: int) -> dict | None:
    """`count` training-split rows no run trains on (from HELDOUT_OFFSET on), preprocessed; None for 0.
    A 1,000-row test split tells strategies a point apart only by chance (a binomial standard
    error of ~1.3 points, the same rows for every seed); thousands more rows of the same source
    say whether the difference holds."""
    if not count:
        return None
    spec = TASKS[task]
    data_cfg = DataConfig(source=spec["source"], max_length=spec.get("max_length", 128), image_size=spec.get("image_size"))
    model_cfg = ModelConfig(name=spec["model"])
    rows = load_source(data_cfg, seed=0).splits["train"].limit(HELDOUT_OFFSET + count).take_batch(
        HELDOUT_OFFSET + count, batch_format="numpy")  # fmt: skip
    if len(next(iter(rows.values()))) < HELDOUT_OFFSET + count:
        raise SystemExit(f"--heldout-rows {count}: the {task} training split holds fewer than {HELDOUT_OFFSET + count} rows")
    preprocessor = models.build_preprocessor(model_cfg, data_cfg)
    held = preprocessor({key: value[HELDOUT_OFFSET:] for key, value in rows.items()})
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in held.items()}


def accuracy(model, data: dict, num_labels: int, precision: str) -> float:
    """`model`'s accuracy on preprocessed rows (the held-out rows; bench/auto.py's val and test)."""
    evaluation = Classification([str(i) for i in range(num_labels)])
    count = len(next(iter(data.values())))
    rows = steps.evaluate_rows(model, _batches(data, 100, torch.arange(count)), evaluation,
                               device=torch.device("cpu"), precision=precision)  # fmt: skip
    return evaluation.metrics(rows, "eval")["eval/accuracy"]


def _batches(data: dict, batch_size: int, order: torch.Tensor):
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield {k: v[index] for k, v in data.items()}


def settings(task: str, strategy_name: str, args) -> tuple[float, dict]:
    """The learning rate and strategy section a run uses: the tables above unless --lr/--options say otherwise."""
    lr = args.lr or LEARNING_RATES[task][strategy_name]
    return lr, {**STRATEGIES[strategy_name], **json.loads(args.options or "{}")}


def probe_lr_scale(task: str, lr: float) -> float:
    """lp_ft's probe runs at linear_probe's measured rate: that rate over the run's `lr`."""
    return LEARNING_RATES[task]["linear_probe"] / lr


def same_settings(row: dict, args) -> bool:
    lr, section = settings(row["task"], row["strategy"], args)
    # rows from before --batchnorm existed ran the legacy way; text models have no BatchNorm layer
    batchnorm_matches = row["task"] == "text" or row.get("batchnorm", "legacy") == args.batchnorm
    return batchnorm_matches and (row["epochs"], row["lr"], row.get("strategy_section"), row.get("eval_split", "test")) == (
        args.epochs, lr, section, args.eval_split)  # fmt: skip


def comparable(rows: list[dict], args) -> list[dict]:
    """The rows of --results that `args` would produce: same settings (held-out rows scored, when
    asked), the latest of each (task, size, strategy, seed)."""
    kept = [r for r in rows if same_settings(r, args)]
    if getattr(args, "heldout_rows", 0):
        kept = [r for r in kept if r.get("heldout_rows") == args.heldout_rows]
    return list({(r["task"], r["size"], r["strategy"], r["seed"]): r for r in kept}.values())


def run_one(task: str, size: int, strategy_name: str, seed: int, args, data, heldout: dict | None = None) -> dict:
    train, test, num_labels, model_cfg = data
    if size > HELDOUT_OFFSET and heldout is not None:
        raise SystemExit(f"--heldout-rows: {size} training rows would reach the held-out rows (from row {HELDOUT_OFFSET})")
    started = time.perf_counter()
    lr, section = settings(task, strategy_name, args)
    steps_per_epoch = size // args.batch_size
    torch.manual_seed(seed)
    model = models.build_model(model_cfg, num_labels, TASKS[task].get("image_size", 224))
    resolved = dict(section)
    if strategy_name == "gradual_unfreeze" and "every_epochs" not in section and "every_steps" not in section:
        resolved["every_steps"] = max(1, steps_per_epoch * args.epochs // (2 * len(layer_groups(model))))
    if strategy_name == "lp_ft" and "probe_lr_scale" not in section:
        resolved["probe_lr_scale"] = probe_lr_scale(task, lr)
    cfg = parse({"data": {"source": "x"}, "model": {"name": "x"}, "strategy": resolved, "optim": {"lr": lr},
                 "schedule": {"name": "linear", "warmup_ratio": 0.1}, "train": {"epochs": args.epochs}})  # fmt: skip
    training = build_training(cfg, model, steps_per_epoch)  # the run's own chain: weight-decay split included
    strategy, optimizer, scheduler = training.strategy, training.optimizer, training.scheduler
    loss_fn = torch.nn.CrossEntropyLoss()
    device = torch.device("cpu")
    precision = steps.resolve_precision("auto", device)
    generator = torch.Generator().manual_seed(seed)
    ever_trained: set[int] = set()

    def before_step(epoch: int, step: int) -> None:
        strategy.before_step(epoch, epoch * steps_per_epoch + step, model)
        ever_trained.update(id(p) for p in model.parameters() if p.requires_grad)

    legacy = args.batchnorm == "legacy"  # every BatchNorm layer in train mode, statistics as tracked
    modes = None if legacy else training.train_modes
    for epoch in range(args.epochs):
        order = torch.randperm(size, generator=generator)
        steps.train_epoch(
            model, _batches(train, args.batch_size, order), optimizer, scheduler, loss_fn, device=device,
            precision=precision, max_steps=steps_per_epoch, max_grad_norm=1.0, penalty=lambda: strategy.penalty(model),
            before_step=lambda step, epoch=epoch: before_step(epoch, step), train_modes=modes and modes.apply,
        )  # fmt: skip
    recalibrate_started = time.perf_counter()
    if not legacy:  # as the worker loop does before an evaluation, with its default 16 batches
        tracked = set(batchnorm.batchnorm_layers(model)) - batchnorm.frozen_layers(model)
        order = torch.randperm(size, generator=generator)
        batchnorm.recalibrate(model, _batches(train, args.batch_size, order), tracked,
                              lambda batch: steps.forward(model, batch, device, precision), max_batches=16)  # fmt: skip
    recalibrate_s = time.perf_counter() - recalibrate_started
    evaluation = Classification([str(i) for i in range(num_labels)])
    rows = steps.evaluate_rows(
        model, _batches(test, 100, torch.arange(TEST_SAMPLES)), evaluation, device=device, precision=precision
    )
    metrics = evaluation.metrics(rows, "eval")
    # Parameters the optimizer held and that were unfrozen at some epoch (gradual unfreezing
    # never reaches its lowest groups in a short run).
    in_optimizer = {id(p) for g in training.param_groups for p in g["params"]} & ever_trained
    if heldout is not None:
        metrics["heldout_accuracy"] = accuracy(model, heldout, num_labels, precision)
    return {
        "task": task, "size": size, "strategy": strategy_name, "seed": seed, "lr": lr, "epochs": args.epochs,
        "strategy_section": section, "resolved": cfg.strategy.model_dump(), "eval_split": args.eval_split,
        "batchnorm": args.batchnorm, "recalibrate_s": recalibrate_s,
        # named test_* whatever the split, so selection runs and final runs share one table
        "test_accuracy": metrics["eval/accuracy"], "test_macro_f1": metrics["eval/macro_f1"],
        "trainable_params": sum(p.numel() for p in model.parameters() if id(p) in in_optimizer),
        "total_params": sum(p.numel() for p in model.parameters()), "wall_s": time.perf_counter() - started,
        **({"heldout_accuracy": metrics["heldout_accuracy"], "heldout_rows": args.heldout_rows} if heldout else {}),
    }  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    table = {}
    for row in rows:
        table.setdefault((row["task"], row["size"], row["strategy"]), []).append(row)
    out = []
    for (task, size, strategy), runs in sorted(table.items()):
        accuracies = [r["test_accuracy"] for r in runs]
        heldout = [r["heldout_accuracy"] for r in runs if "heldout_accuracy" in r]
        out.append({
            "task": task, "size": size, "strategy": strategy, "seeds": len(runs),
            "test_accuracy_mean": round(statistics.mean(accuracies), 4),
            "test_accuracy_std": round(statistics.stdev(accuracies), 4) if len(runs) > 1 else None,
            # every seed's held-out accuracy, or none: a mean over fewer seeds than the test's would mislead
            "heldout_accuracy_mean": round(statistics.mean(heldout), 4) if heldout and len(heldout) == len(runs) else None,
            "heldout_accuracy_std": round(statistics.stdev(heldout), 4) if len(heldout) == len(runs) > 1 else None,
            "trainable_params": runs[0]["trainable_params"],
            "wall_s_mean": round(statistics.mean(r["wall_s"] for r in runs), 1),
        })  # fmt: skip
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| task | labelled | strategy | test accuracy (mean ± sd) | held-out accuracy (mean) | seeds | trainable params | wall s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary:
        spread = f" ± {row['test_accuracy_std']:.3f}" if row["test_accuracy_std"] is not None else ""
        heldout = f"{row['heldout_accuracy_mean']:.3f}" if row["heldout_accuracy_mean"] is not None else ""
        lines.append(
            f"| {row['task']} | {row['size']} | {row['strategy']} | {row['test_accuracy_mean']:.3f}{spread} "
            f"| {heldout} | {row['seeds']} | {row['trainable_params']:,} | {row['wall_s_mean']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[500, 2000])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results", default="bench/results/strategies.jsonl")
    parser.add_argument("--eval-split", default="test", choices=["test", "val"], help="val: for choosing settings")
    parser.add_argument("--lr", type=float, help="learning rate for every strategy run (default: the table)")
    parser.add_argument("--options", help='JSON merged into the strategy section, e.g. \'{"layer_decay": 0.9}\'')
    parser.add_argument("--batchnorm", default="recalibrate", choices=["recalibrate", "legacy"],
                        help="recalibrate: frozen BatchNorm layers in eval mode, statistics recalibrated before the "
                        "test (what a run does); legacy: every layer in train mode, statistics as tracked (before)")
    parser.add_argument("--heldout-rows", type=int, default=0,
                        help="also score every run on this many training-split rows that no setting trains on")
    parser.add_argument("--report", action="store_true", help="print the markdown table of --results and stop")
    args = parser.parse_args()
    results = Path(args.results)
    if args.report:
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        print(markdown(summarise(comparable(rows, args))))
        return

    import ray

    ray.init(log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = comparable(done, args)  # rows from other settings are history (and, with --heldout-rows, runs that did not score them)
    finished = {(r["task"], r["size"], r["strategy"], r["seed"]) for r in done}
    for task in args.tasks:
        for size in args.sizes:
            data = None
            heldout = heldout_data(task, args.heldout_rows)
            for seed in args.seeds:
                for strategy in args.strategies:
                    if (task, size, strategy, seed) in finished:
                        continue
                    data = data or _task_data(task, size, args.eval_split)
                    try:
                        row = run_one(task, size, strategy, seed, args, data, heldout)
                    except ValueError as error:  # a strategy this model cannot take (e.g. lora on Lite)
                        print(json.dumps({"task": task, "strategy": strategy, "skipped": str(error)}), flush=True)
                        continue
                    print(json.dumps(row), flush=True)
                    with results.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    done.append(row)
    ray.shutdown()
    print(json.dumps(summarise(done)))


if __name__ == "__main__":
    main()
