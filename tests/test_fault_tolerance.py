"""Surviving failures: checkpoint storage every node reaches, a killed driver resumed with
`finetune train --resume`, a killed worker process replaced from the latest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import sentiment_rows, write_csv
from finetune.cli import main
from finetune.config import ConfigError
from finetune.train.storage import check_shared_storage, mount_type

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
fileserver:/export/runs /mnt/shared nfs4 rw,relatime 0 0
s3bucket /mnt/s3 fuse.mountpoint-s3 rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


def test_multi_node_runs_need_storage_every_node_reaches():
    assert mount_type("/mnt/shared/run1", MOUNTS) == "nfs4"
    assert mount_type("/home/me/runs", MOUNTS) == "ext4"
    assert mount_type("/tmp/x", MOUNTS) == "tmpfs"
    for shared in ("s3://bucket/runs", "gs://bucket/runs", "/mnt/shared/runs", "/mnt/s3/runs"):
        check_shared_storage(shared, False, nodes=3, mounts=MOUNTS)
    check_shared_storage("/home/me/runs", False, nodes=1, mounts=MOUNTS)  # one machine: any disk will do
    check_shared_storage("/home/me/runs", True, nodes=3, mounts=MOUNTS)  # declared shared
    for local in ("/home/me/runs", "file:///home/me/runs", "/tmp/runs"):
        with pytest.raises(ConfigError, match="own disk .* the cluster has 3 nodes") as error:
            check_shared_storage(local, False, nodes=3, mounts=MOUNTS)
        assert "s3://" in error.value.problems[0] and "storage_is_shared" in error.value.problems[0]


def _pipeline(tmp_path: Path, tiny_bert_dir: Path, **train) -> Path:
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(400))
    pipeline = tmp_path / "ft.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "ft",
        "data": {"source": str(data), "text_column": "review", "label_column": "sentiment", "max_length": 16},
        "model": {"name": f"hf:{tiny_bert_dir}"},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 3, "batch_size": 16, "precision": "fp32", "seed": 0, **train},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 2},
        "checkpoint": {"num_to_keep": 2},
    }))  # fmt: skip
    return pipeline


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "ray" / run_dir.name).glob("checkpoint_*"))


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_driver_resumes_from_its_last_checkpoint(ray_session, tmp_path, tiny_bert_dir, capsys):
    pipeline, run_dir = _pipeline(tmp_path, tiny_bert_dir), tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "train", str(pipeline), "--run-dir", str(run_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not _checkpoints(run_dir):
            assert driver.poll() is None and time.time() < deadline, "no checkpoint before the driver ended"
            time.sleep(0.5)
        time.sleep(3)  # Ray registers a reported checkpoint on a ~2 s poll
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (run_dir / "summary.json").exists()

    assert main(["train", "--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= 1  # not from scratch
    assert [e["epoch"] for e in _epochs(run_dir)] == [0, 1, 2]
    assert summary["test_accuracy"] > 0.9 and summary["best_checkpoint"]
    assert main(["train", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "is not a run directory" in capsys.readouterr().out
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 2  # a finished run is not overwritten
    assert f"already holds a run: continue it with --resume {run_dir}" in capsys.readouterr().out


def test_a_killed_worker_is_replaced_and_the_run_matches_an_uninterrupted_one(ray_session, tmp_path, tiny_bert_dir):
    """SIGKILL of the training worker mid-epoch 2: the worker group restarts from the epoch-1
    checkpoint (FailureConfig) and finishes with the metrics of an uninterrupted run."""
    pipeline = _pipeline(tmp_path, tiny_bert_dir, epochs=3)
    clean = tmp_path / "clean"
    assert main(["train", str(pipeline), "--run-dir", str(clean)]) == 0

    run_dir = tmp_path / "killed"

    def kill_worker_mid_epoch() -> None:
        deadline = time.time() + 300
        while not _checkpoints(run_dir) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(4)  # into epoch 2, after Ray registered epoch 1's checkpoint
        from ray.util.state import list_actors

        address = ray_session.get_runtime_context().gcs_address
        workers = list_actors(address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_worker_mid_epoch, daemon=True)
    killer.start()
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 0
    killer.join(timeout=5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1
    reference = json.loads((clean / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=0.03)
    assert [e["epoch"] for e in _epochs(run_dir)] == [0, 1, 2]
    assert _epochs(run_dir)[-1]["val/accuracy"] == pytest.approx(_epochs(clean)[-1]["val/accuracy"], abs=0.05)
