"""ASHA vs FIFO: the same 16-trial search on a real offline task, run twice in one go.

MiniLM-L6 on Rotten Tomatoes (--train-rows training texts, 300 validation, 300 test), 9
epochs per trial, one trial at a time; the search draws the learning rate, weight decay,
strategy (full or discriminative) and layer decay with the same seed in both sweeps, so both
see the same 16 configurations, in the same order. FIFO runs every trial to the end; ASHA
(grace 1 epoch, reduction factor 4: rungs at 1 and 4 epochs; --reduction-factor 3: at 1 and
3) stops the trailing ones. One trial at a time and one worker per trial, seeded: a
configuration trains nearly alike in both sweeps (bf16 CPU kernels are not bit-exact between
runs), so the difference in the winners is ASHA's decisions. Each sweep tests its winner on
the test split (summary.json).

    .venv/bin/python bench/tune.py --keep /tmp/tunebench2   # 1,000 texts, ASHA rf 4: ~2.5 h on 2 cores (recorded)
    .venv/bin/python bench/tune.py --keep /tmp/tunebench2 --reduction-factor 3  # the same FIFO sweep, ASHA rf 3
    .venv/bin/python bench/tune.py --train-rows 400 --reduction-factor 3  # ~60 min (the first recorded run)
    .venv/bin/python bench/tune.py --samples 4 --epochs 3 --train-rows 200   # a quick look

Goal: ASHA's best validation accuracy within 0.5 points of FIFO's, using at most a third of
FIFO's trial-epochs. The last line printed is one JSON object with fifo_trial_epochs,
asha_trial_epochs, fifo_best, asha_best (best validation accuracy), the winners' test
accuracy and the wall times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console


def pipeline(args, scheduler: dict) -> dict:
    return {
        "name": "sweep-bench",
        "data": {"source": "rotten_tomatoes", "max_train_samples": args.train_rows, "max_eval_samples": args.eval_rows,
                 "max_length": 64},
        "model": {"name": "minilm-l6"},
        "optim": {"name": "adamw"},
        "schedule": {"name": "linear", "warmup_ratio": 0.1},
        "train": {"epochs": args.epochs, "batch_size": 32, "eval_batch_size": 128, "seed": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpoint": {"metric": "val/accuracy", "num_to_keep": 1},
        "tune": {
            "search_space": {
                "optim.lr": {"loguniform": [1e-6, 1e-3]},
                "optim.weight_decay": {"uniform": [0.0, 0.1]},
                "strategy.name": {"choice": ["full", "discriminative"]},
                "strategy.layer_decay": {"uniform": [0.6, 0.95]},
            },
            "num_samples": args.samples, "metric": "val/accuracy", "scheduler": scheduler,
            "max_concurrent_trials": 1, "seed": args.seed,
        },
    }  # fmt: skip


def run_sweep(raw: dict, sweep_dir: Path, console: Console) -> dict:
    """The sweep in `sweep_dir`: run, continued where an earlier attempt stopped (`--keep DIR`
    again after an interruption), or read back when it finished. Wall time adds up the attempts."""
    from finetune import config as config_module
    from finetune.tuning.space import check_search_space
    from finetune.tuning.sweep import EXPERIMENT, resume, sweep

    cfg = config_module.parse(raw)
    assert not check_search_space(raw, cfg.tune)
    wall_file = sweep_dir / "bench_wall_s.txt"
    earlier = float(wall_file.read_text()) if wall_file.is_file() else 0.0
    trials = _finished_trials(sweep_dir, cfg.tune.num_samples)
    if trials is not None:
        summary = json.loads((sweep_dir / "summary.json").read_text())
        wall = earlier
    else:
        started = time.perf_counter()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        done = threading.Event()

        def record_wall() -> None:  # every few seconds, so a killed attempt's time still counts
            while not done.wait(5):
                wall_file.write_text(f"{earlier + time.perf_counter() - started:.1f}")

        threading.Thread(target=record_wall, daemon=True).start()
        if (sweep_dir / EXPERIMENT).is_dir():
            # an errored trial failed on the machine (a full disk, say), not on its values: run it again
            summary = resume(sweep_dir, retry_errored=True, console=console)
        else:
            summary = sweep(cfg, raw, sweep_dir, console)
        done.set()
        wall = earlier + time.perf_counter() - started
        wall_file.write_text(f"{wall:.1f}")
        trials = _finished_trials(sweep_dir, cfg.tune.num_samples)
        if trials is None:  # stopped (Ctrl-C) before every trial ended
            raise SystemExit(f"{sweep_dir}: the sweep stopped before all {cfg.tune.num_samples} trials ended; "
                             "run the same command again to continue it")  # fmt: skip
    return {"trial_epochs": summary["trial_epochs"], "best": summary["best"]["val/accuracy"],
            "best_params": summary["best"]["params"], "test_accuracy": summary["best"]["test/accuracy"],
            "stopped_early": summary["stopped_early"], "wall_s": round(wall, 1),
            # the trials' own training time, summed: unlike wall time, blind to stalls between trials
            "trial_s": round(float(trials["wall_s"].sum()), 1)}  # fmt: skip


def _finished_trials(sweep_dir: Path, trials: int) -> pd.DataFrame | None:
    """The trial table of a sweep whose summary lists every trial, each ended (not one
    interrupted mid-way); None for a sweep still to run or continue."""
    if not (sweep_dir / "summary.json").is_file():
        return None
    rows = pd.read_csv(sweep_dir / "results.csv")
    ended = len(rows) == trials and (rows["status"] == "TERMINATED").all() and (rows["epochs_run"] > 0).all()
    return rows if ended else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduction-factor", type=float, default=4.0,
                        help="ASHA's reduction factor (its sweep folder is asha-rf<N> when not 3)")
    parser.add_argument("--keep", help="keep both sweep folders here (default: a temporary folder); "
                        "run again with the same folder to continue an interrupted benchmark")
    args = parser.parse_args()

    import ray

    ray.init(log_to_driver=False, logging_level="ERROR")  # with the dashboard: Train's PG cleaner needs it
    console = Console(quiet=True)
    asha = {"name": "asha", "time_attr": "epochs", "grace_period": 1, "reduction_factor": args.reduction_factor}
    asha_dir = "asha" if args.reduction_factor == 3 else f"asha-rf{args.reduction_factor:g}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        results = {}
        for name, folder, scheduler in (("fifo", "fifo", {"name": "fifo"}), ("asha", asha_dir, asha)):
            raw = pipeline(args, scheduler)
            results[name] = run_sweep(raw, root / folder, console)
            print(json.dumps({"sweep": name, **results[name]}), flush=True)
        (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline(args, asha), sort_keys=False))
    ray.shutdown()
    fifo, asha_result = results["fifo"], results["asha"]
    print(json.dumps({
        "task": f"minilm-l6 / rotten_tomatoes, {args.train_rows} train rows", "trials": args.samples,
        "asha_reduction_factor": args.reduction_factor,
        "epochs_per_trial": args.epochs,
        "fifo_trial_epochs": fifo["trial_epochs"], "asha_trial_epochs": asha_result["trial_epochs"],
        "trial_epochs_ratio": round(asha_result["trial_epochs"] / fifo["trial_epochs"], 3),
        "fifo_best": fifo["best"], "asha_best": asha_result["best"],
        "best_gap_points": round(100 * (fifo["best"] - asha_result["best"]), 2),
        "fifo_test_accuracy": fifo["test_accuracy"], "asha_test_accuracy": asha_result["test_accuracy"],
        "fifo_wall_s": fifo["wall_s"], "asha_wall_s": asha_result["wall_s"],
        "fifo_trial_s": fifo["trial_s"], "asha_trial_s": asha_result["trial_s"],
        "asha_stopped_early": asha_result["stopped_early"],
        "fifo_best_params": fifo["best_params"], "asha_best_params": asha_result["best_params"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
