"""`finetune serve` under load: requests/s and p50/p99 latency with 1 and N concurrent clients,
dynamic batching on and off, against a real Ray Serve endpoint on 127.0.0.1.

Each client sends one Rotten Tomatoes snippet per request, back to back, over its own HTTP
session. Latency does not depend on what the weights learned, so by default the served run is
MiniLM-L6 with a new head saved as a run folder (no training); --run-dir serves a real run.

    .venv/bin/python bench/serve.py                          # MiniLM, 1 and 16 clients
    .venv/bin/python bench/serve.py --run-dir runs/reviews --clients 32 --seconds 20

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests


def _untrained_run(folder: Path, max_length: int) -> Path:
    """A run folder (config.yaml + best/) holding MiniLM-L6 with a fresh 2-class head."""
    from finetune import config as config_module
    from finetune import models
    from finetune.tasks.classification import Classification

    cfg = config_module.parse({"name": "serve-bench", "data": {"source": "rotten_tomatoes", "max_length": max_length},
                               "model": {"name": "minilm-l6"}})  # fmt: skip
    model = models.build_model(cfg.model, num_labels=2).eval()
    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    models.save_model(model, folder / "best", cfg.model, preprocessor, Classification(["fresh", "rotten"]))
    config_module.save(cfg, folder / "config.yaml")
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads posting one text per request for `seconds`; latencies in ms."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0]
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        session, i = requests.Session(), index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = session.post(f"{url}/predict", json={"inputs": [texts[i % len(texts)]]}, timeout=120)
            if response.status_code != 200:
                failures[0] += 1
            latencies[index].append((time.perf_counter() - started) * 1000)
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    every = np.array([value for part in latencies for value in part])
    return {"clients": clients, "requests": int(every.size), "failed": failures[0],
            "requests_per_s": every.size / elapsed, "p50_ms": float(np.percentile(every, 50)),
            "p99_ms": float(np.percentile(every, 99))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="serve this run (default: untrained MiniLM-L6 saved as a run)")
    parser.add_argument("--clients", type=int, default=16, help="the concurrent clients of the second load")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batching on; off is 1")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=2.0)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    import ray

    from finetune import serving
    from finetune.data.catalog import rotten_tomatoes_rows

    texts = rotten_tomatoes_rows()[0][:2000]
    ray.init(num_cpus=max(2, int(args.replicas * args.cpus_per_replica)), log_to_driver=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run_dir) if args.run_dir else _untrained_run(Path(scratch) / "run", args.max_length)
        results = []
        for batch_size in (1, args.max_batch_size):
            options = serving.ServeOptions(port=_free_port(), replicas=args.replicas, max_batch_size=batch_size,
                                           cpus_per_replica=args.cpus_per_replica)  # fmt: skip
            url = serving.start(run_dir, options)
            try:
                _load(url, texts, 1, 2.0)  # warm-up: first requests pay for the proxy's and replica's start
                for clients in (1, args.clients):
                    results.append({"batching": "off" if batch_size == 1 else "on", "max_batch_size": batch_size,
                                    **_load(url, texts, clients, args.seconds)})  # fmt: skip
                    print(json.dumps(results[-1]), flush=True)
            finally:
                serving.stop()
    ray.shutdown()

    def find(batching: str, clients: int) -> dict:
        return next(r for r in results if r["batching"] == batching and r["clients"] == clients)

    out = {
        "model": args.run_dir or "minilm-l6 (untrained head)", "max_length": args.max_length,
        "replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica, "seconds_per_load": args.seconds,
        "results": results,
        # one run, same machine: batching's gain in throughput at N clients, and its cost in latency at 1
        "throughput_batching_on_vs_off_at_n_clients": find("on", args.clients)["requests_per_s"]
        / find("off", args.clients)["requests_per_s"],
        "p50_batching_on_vs_off_at_1_client": find("on", 1)["p50_ms"] / find("off", 1)["p50_ms"],
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
