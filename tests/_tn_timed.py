"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`), one training worker on each:
what tests/test_fault_tolerance.py checks on a multi-node cluster. It runs in its own process
(the test session's Ray is already initialised in pytest's) and prints one JSON object.

    python tests/two_node_cluster.py WORKDIR PIPELINE [SCENARIO ...]

Scenarios, in order, on one cluster:
  refused    the pipeline as written: checkpoints on this machine's disk -> exit 2
  clean      checkpoint.storage_is_shared=true: an uninterrupted run, the reference
  kill       SIGKILL of rank 1's process once the first epoch's checkpoint is registered
  remove     the node holding rank 1 removed at that moment, a replacement node added
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from helpers import WARM_WORKERS, registered_checkpoint  # this folder is the script's: first on sys.path

NODE_CPUS = 2  # per node: one for the training worker, one for Ray Data


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_in_background(argv: list[str]) -> tuple[threading.Thread, dict]:
    """`finetune train` on a thread: Cluster.add_node must run on the main thread."""
    from finetune.cli import main

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(code=main(argv)), daemon=True)
    thread.start()
    return thread, outcome


def _train_workers(gcs_address: str) -> list:
    from ray.util.state import list_actors

    return list_actors(gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["epochs_logged"] = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary


def _run_with_fault(workdir: Path, pipeline: str, name: str, fault) -> dict:
    """Train; once Ray Train has registered the first epoch's checkpoint, `fault(rank 1's worker)`:
    it lands in epoch 2 (a fixed delay after the checkpoint's folder appeared missed the training
    once runs got faster)."""
    run_dir = workdir / name
    thread, outcome = _train_in_background(["train", pipeline, "--run-dir", str(run_dir), "checkpoint.storage_is_shared=true"])
    deadline = time.time() + 300
    while not registered_checkpoint(run_dir):
        assert thread.is_alive() and time.time() < deadline, f"{name}: no checkpoint before the run ended"
        time.sleep(0.2)
    hit_while_training = thread.is_alive()
    fault()
    thread.join(timeout=600)
    return {"code": outcome.get("code"), "hit_while_training": hit_while_training, **_summary(run_dir)}


def main(workdir: Path, pipeline: str, scenarios: list[str]) -> dict:
    # A private cluster other drivers cannot join; a short path: Ray's socket paths must fit 107 bytes.
    print("T", time.time(), "start", file=sys.stderr, flush=True)
    ray_tmp = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    import ray
    from ray.cluster_utils import Cluster

    # The dashboard serves the state API (worker pids); on a free port, beside the test session's Ray.
    head = {"num_cpus": NODE_CPUS, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
            "_system_config": WARM_WORKERS}  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args=head)
    worker_node = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    gcs_address = ray.get_runtime_context().gcs_address
    head_id = ray.get_runtime_context().get_node_id()
    results: dict = {"head_node_id": head_id}
    try:
        from finetune.cli import main as cli

        print("T", time.time(), "refused", file=sys.stderr, flush=True)
        if "refused" in scenarios:
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                code = cli(["train", pipeline, "--run-dir", str(workdir / "refused")])
            refused = {"code": code, "output": output.getvalue(), "run_dir_made": (workdir / "refused").exists()}
            results["refused"] = refused

        print("T", time.time(), "clean", file=sys.stderr, flush=True)
        if "clean" in scenarios:
            code = cli(["train", pipeline, "--run-dir", str(workdir / "clean"), "checkpoint.storage_is_shared=true"])
            results["clean"] = {"code": code, **_summary(workdir / "clean")}

        def kill_rank_1() -> None:
            (worker,) = [w for w in _train_workers(gcs_address) if w.node_id != head_id]
            os.kill(worker.pid, signal.SIGKILL)

        print("T", time.time(), "kill", file=sys.stderr, flush=True)
        if "kill" in scenarios:
            results["kill"] = _run_with_fault(workdir, pipeline, "kill", kill_rank_1)

        replacement: dict = {}

        def remove_rank_1_node() -> None:
            nonlocal worker_node
            cluster.remove_node(worker_node)
            worker_node = cluster.add_node(num_cpus=NODE_CPUS)  # STRICT_SPREAD waits for it
            replacement["node_id"] = worker_node.node_id

        print("T", time.time(), "remove", file=sys.stderr, flush=True)
        if "remove" in scenarios:
            results["remove"] = _run_with_fault(workdir, pipeline, "remove", remove_rank_1_node)
            results["remove"]["replacement_node_id"] = replacement["node_id"]
        print("T", time.time(), "end", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:] or ["refused", "clean", "kill", "remove"])))
