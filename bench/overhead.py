"""The cost of Ray itself: one Ray Train worker fed by Ray Data vs a bare PyTorch loop.

Both train the same model (MiniLM-L6 by default) on the same Rotten Tomatoes rows with the
same batch size for the same number of steps, through the same `train_epoch` step code, and
both tokenize their batches with the same preprocessor (Ray Data in its own tasks, the bare
loop inline). Steady-state throughput excludes the first `--warmup-steps` steps; start-up
(process/actor start, model build, first batch) is reported apart.

    .venv/bin/python bench/overhead.py                  # MiniLM, 80 steps of 32, 3 alternating repetitions
    .venv/bin/python bench/overhead.py --steps 20 --model hf:/path/to/tiny-bert

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune import models
from finetune.config import DataConfig, ModelConfig, parse
from finetune.data.catalog import rotten_tomatoes_rows
from finetune.training import steps
from finetune.training.trainer import ShardingConfig
from finetune.training.setup import build_training


def _parts(model_name: str, max_length: int, total_steps: int):
    model_cfg = ModelConfig(name=model_name)
    torch.manual_seed(0)
    model = models.build_model(model_cfg, num_labels=2)
    preprocessor = models.build_preprocessor(model_cfg, DataConfig(source="rotten_tomatoes", max_length=max_length))
    cfg = parse({"data": {"source": "rotten_tomatoes"}, "model": {"name": model_name}, "optim": {"lr": 5e-5},
                 "schedule": {"name": "linear", "warmup_ratio": 0.1}, "train": {"epochs": 1}})  # fmt: skip
    training = build_training(cfg, model, total_steps)  # the run's own chain (strategy full, weight-decay split)
    return model, preprocessor, training.optimizer, training.scheduler, torch.nn.CrossEntropyLoss()


def _timed_run(model, batches, optimizer, scheduler, loss_fn, args, device=torch.device("cpu")) -> tuple[list[float], float]:
    """Runs `args.steps` steps; returns the time at which each step ended and the seconds spent
    waiting for batches after the warm-up steps."""
    step_ends: list[float] = []
    waited_by_step: list[float] = []

    def on_step(step, loss, stats):
        step_ends.append(time.perf_counter())
        waited_by_step.append(stats.data_wait_seconds)

    steps.train_epoch(
        model, batches, optimizer, scheduler, loss_fn,
        device=device, precision=steps.resolve_precision(args.precision, device), max_steps=args.steps,
        max_grad_norm=1.0, on_step=on_step,
    )  # fmt: skip
    return step_ends, waited_by_step[-1] - waited_by_step[args.warmup_steps]


def _steady_samples_per_s(step_ends: list[float], warmup: int, batch_size: int) -> float:
    measured = step_ends[warmup:]
    return (len(measured) - 1) * batch_size / (measured[-1] - measured[0])


def bare_torch(rows: list[dict], args) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model, preprocessor, optimizer, scheduler, loss_fn = _parts(args.model, args.max_length, args.steps)

    def batches():
        for i in range(0, len(rows) - args.batch_size + 1, args.batch_size):
            chunk = rows[i : i + args.batch_size]
            encoded = preprocessor({"text": np.array([r["text"] for r in chunk], dtype=object),
                                    "label": np.array([r["label"] for r in chunk])})  # fmt: skip
            yield {k: torch.from_numpy(v) for k, v in encoded.items()}

    step_ends, data_wait_s = _timed_run(model, batches(), optimizer, scheduler, loss_fn, args)
    return {"startup_s": step_ends[0] - started, "step_ends": step_ends, "data_wait_s": data_wait_s}


def _ray_worker(config: dict) -> None:
    import ray.train

    args = argparse.Namespace(**config["args"])
    started = time.perf_counter()
    torch.set_num_threads(config["threads"] or (os.cpu_count() or 1))
    model, _, optimizer, scheduler, loss_fn = _parts(args.model, args.max_length, args.steps)
    model = ray.train.torch.prepare_model(model)
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=args.batch_size, drop_last=True, prefetch_batches=args.prefetch_batches)
    step_ends, data_wait_s = _timed_run(model, batches, optimizer, scheduler, loss_fn, args)
    Path(config["out"]).write_text(json.dumps({
        "startup_s": step_ends[0] - started, "step_ends": step_ends, "data_wait_s": data_wait_s,
        "torch_threads": torch.get_num_threads(),
    }))  # fmt: skip


def ray_train(rows: list[dict], args, dataset_config, workers: int = 1) -> dict:
    """`workers=0`: Ray Train's local mode, the loop in this process (no controller or worker actors)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from finetune.data.preprocess import preprocess
    from finetune.data.rows import RowPolicy

    preprocessor = models.build_preprocessor(
        ModelConfig(name=args.model), DataConfig(source="rotten_tomatoes", max_length=args.max_length)
    )
    train = preprocess(ray.data.from_items(rows), preprocessor, RowPolicy("train"))
    if args.materialize:
        train = train.materialize()  # tokenize up front: isolates Ray Train's cost from Ray Data's
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "ray.json"
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"args": vars(args), "out": str(out), "threads": args.ray_threads},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": args.ray_cpus}),
            run_config=ray.train.RunConfig(storage_path=directory, name="overhead"),
            datasets={"train": train},
            dataset_config=dataset_config,
        )
        fit_started = time.perf_counter()
        trainer.fit()
        fit_s = time.perf_counter() - fit_started
        result = json.loads(out.read_text())
    result["fit_s"] = fit_s
    return result


def _finetune_ingest() -> ShardingConfig:
    """finetune's ingest for one worker: it iterates its datasets itself (no split coordinator)."""
    return ShardingConfig(execution_options=ShardingConfig.default_ingest_options())


def _ray_as_before(rows: list[dict], args) -> dict:
    """The Ray path on a Ray with the dashboard and Train's preemption watcher."""
    import ray

    from finetune.ray_env import LEAN_LOCAL_ENV

    lean = {name: os.environ.pop(name) for name in LEAN_LOCAL_ENV if name in os.environ}
    try:
        ray.init(log_to_driver=False, logging_level="WARNING", include_dashboard=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
        return ray_train(rows, args, _finetune_ingest())
    finally:
        ray.shutdown()
        os.environ.update(lean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs the Ray Train worker reserves")
    parser.add_argument("--ray-threads", type=int, default=0, help="torch threads in the worker; 0 = all cores")
    parser.add_argument("--ray-as-before", action="store_true",
                        help="also, each repetition: Ray started with its dashboard and Train's preemption watcher "
                             "(as `finetune train` did before 2026-12-06, and as sweeps still do)")
    parser.add_argument("--prefetch-batches", type=int, default=2, help="iter_torch_batches prefetch (the loop's: 2)")
    parser.add_argument("--materialize", action="store_true", help="tokenize before training (diagnostic)")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of each path")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also, each repetition: the bare loop beside an idle Ray and as a Ray task, Ray Train's "
                             "local mode, and Ray's streaming_split ingest")
    args = parser.parse_args()

    texts, categories = rotten_tomatoes_rows()
    label_names = sorted(set(categories))
    count = args.steps * args.batch_size
    rows = [{"text": t, "label": label_names.index(c)} for t, c in zip(texts[:count], categories[:count])]

    # Alternating repetitions, medians: this shared machine's speed drifts by more than the
    # effect measured. The bare loop runs while Ray is down (a user without Ray has none of its
    # processes); Ray starts afresh each repetition, as each `finetune train` does.
    import ray

    from finetune.ray_env import ensure_ray

    bare_runs, ray_runs, before_runs, init_s = [], [], [], []
    diagnostics: dict = {}
    for rep in range(args.reps):
        if rep % 2 == 0:
            bare_runs.append(bare_torch(rows, args))
        if args.ray_as_before:
            before_runs.append(_ray_as_before(rows, args))
        init_started = time.perf_counter()
        ensure_ray()  # as `finetune train` starts it
        init_s.append(time.perf_counter() - init_started)
        ray.data.DataContext.get_current().enable_progress_bars = False
        if args.diagnostics:
            # Ray's floor: the bare loop in this process beside a Ray that runs nothing, and in a
            # plain Ray task; Ray Train without its actors (local mode: the loop in this process,
            # fed by Ray Data); Ray's default ingest (a streaming_split coordinator actor per
            # dataset, which more than one worker needs)
            for name, measure in (
                ("bare_loop_beside_idle_ray", lambda: bare_torch(rows, args)),
                ("bare_loop_in_ray_task", lambda: ray.get(ray.remote(num_cpus=args.ray_cpus)(bare_torch).remote(rows, args))),
                ("ray_train_local_mode", lambda: ray_train(rows, args, _finetune_ingest(), workers=0)),
                ("ray_split_coordinator", lambda: ray_train(
                    rows, args, ray.train.DataConfig(execution_options=ShardingConfig.default_ingest_options()))),
            ):  # fmt: skip
                diagnostics.setdefault(name, []).append(measure())
        ray_runs.append(ray_train(rows, args, _finetune_ingest()))
        ray.shutdown()
        if rep % 2 == 1:
            bare_runs.append(bare_torch(rows, args))

    def speed(run: dict) -> float:
        return _steady_samples_per_s(run["step_ends"], args.warmup_steps, args.batch_size)

    bare_speeds, ray_speeds = [speed(r) for r in bare_runs], [speed(r) for r in ray_runs]
    torch_speed, ray_speed = statistics.median(bare_speeds), statistics.median(ray_speeds)
    print(json.dumps({
        "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "warmup_steps": args.warmup_steps,
        "precision": steps.resolve_precision(args.precision, torch.device("cpu")), "cpus": os.cpu_count(),
        "reps": args.reps, "ray_worker_cpus": args.ray_cpus, "ray_worker_torch_threads": ray_runs[0]["torch_threads"],
        "materialized": args.materialize, "prefetch_batches": args.prefetch_batches,
        "samples_per_s_torch": round(torch_speed, 2), "samples_per_s_ray": round(ray_speed, 2),
        "ratio": round(ray_speed / torch_speed, 3),
        "samples_per_s_torch_each": [round(v, 2) for v in bare_speeds],
        "samples_per_s_ray_each": [round(v, 2) for v in ray_speeds],
        # steady state: seconds blocked on the next batch (the bare loop: tokenizing it inline)
        "data_wait_s_torch": round(statistics.median(r["data_wait_s"] for r in bare_runs), 2),
        "data_wait_s_ray": round(statistics.median(r["data_wait_s"] for r in ray_runs), 2),
        **{f"ratio_{name}": round(statistics.median(speed(r) for r in runs) / torch_speed, 3)
           for name, runs in diagnostics.items()},
        **{f"samples_per_s_{name}_each": [round(speed(r), 2) for r in runs] for name, runs in diagnostics.items()},
        **({"ratio_ray_as_before": round(statistics.median(speed(r) for r in before_runs) / torch_speed, 3),
            "samples_per_s_ray_as_before_each": [round(speed(r), 2) for r in before_runs]} if before_runs else {}),
        "startup_s_ray_init": round(statistics.median(init_s), 2),
        # fit() time outside the training steps: worker group start, model build, first batch, teardown
        "fit_overhead_s_ray": round(statistics.median(r["fit_s"] - (r["step_ends"][-1] - r["step_ends"][0])
                                                      for r in ray_runs), 2),  # fmt: skip
        "startup_s_worker_to_first_step": round(statistics.median(r["startup_s"] for r in ray_runs), 2),
        "startup_s_torch_to_first_step": round(statistics.median(r["startup_s"] for r in bare_runs), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
