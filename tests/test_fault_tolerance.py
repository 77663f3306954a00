"""Surviving failures: checkpoint storage every node reaches, a killed driver resumed with
`finetune train --resume`, and a lost node on a two-node cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from helpers import ctrl_c, mlflow_history, process_group, registered_checkpoint, tiny_sentiment_pipeline
from finetune.cli import main
from finetune.config import ConfigError
from finetune.ray_env import LOCAL_TRAIN_POLL_S, check_shared_storage, mount_type

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
        with pytest.raises(ConfigError, match=r"own disk .* the cluster has \(or can grow to\) 3 nodes") as error:
            check_shared_storage(local, False, nodes=3, mounts=MOUNTS)
        assert "s3://" in error.value.problems[0] and "storage_is_shared" in error.value.problems[0]


def _pipeline(tmp_path: Path, tiny_bert_dir: Path, rows: int = 400, scaling: dict | None = None,
              tracking: dict | None = None, **train) -> Path:  # fmt: skip
    return tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=rows, name="ft", train=train, tracking=tracking or {},
                                   scaling={"max_failures": 2, **(scaling or {})}, checkpoint={"num_to_keep": 2})  # fmt: skip


def _driver_until_checkpoint(pipeline: Path, run_dir: Path, env: dict, **output) -> subprocess.Popen:
    """`finetune train` in its own process group, returned once its first epoch's checkpoint is
    registered (what a restart or --resume continues from)."""
    driver = subprocess.Popen([sys.executable, "-m", "finetune.cli", "train", str(pipeline), "--run-dir", str(run_dir)],
                              env=env, start_new_session=True, **output)  # fmt: skip
    deadline = time.time() + 300
    while not registered_checkpoint(run_dir):
        if driver.poll() is not None or time.time() > deadline:
            os.killpg(driver.pid, signal.SIGKILL)
            pytest.fail("no checkpoint before the driver ended")
        time.sleep(0.2)
    return driver


def _train_controllers_poll(ray_tmp: str) -> list[str | None]:
    """RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment of each Train controller process of
    the Ray whose processes run with RAY_TMPDIR=`ray_tmp`."""
    seen = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            title, environ = process.cmdline(), process.environ()
            if title and title[0].startswith("ray::TrainController") and environ.get("RAY_TMPDIR") == ray_tmp:
                seen.append(environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))
    return seen


# how the titles of the dashboard's module processes begin (with the dashboard off, Ray keeps a
# headless dashboard.py for usage stats and each node's agent)
DASHBOARD_MODULES = "ray-dashboard-"


def _descendants(pid: int) -> list[str]:
    """The command lines of the processes under `pid`: a local Ray's, when `pid` started it. (Not
    found by RAY_TMPDIR: the titles Ray's dashboard modules set overwrite their environment.)"""
    seen = []
    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            seen.append(" ".join(process.cmdline()))
    return seen


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_a_killed_driver_resumes_from_its_last_checkpoint(ray_session, tmp_path, tiny_bert_dir, capsys):
    pipeline, run_dir = _pipeline(tmp_path, tiny_bert_dir, tracking={"mlflow": {}}), tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = _driver_until_checkpoint(pipeline, run_dir, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (run_dir / "summary.json").exists()
    with open(run_dir / "metrics.jsonl", "a") as metrics:  # as if the kill had landed mid-line
        metrics.write('{"epoch": 1, "train/loss": 0.4, "val/acc')

    assert main(["train", "--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= 1  # not from scratch
    assert [e["epoch"] for e in _epochs(run_dir)] == [0, 1, 2]
    assert summary["test_accuracy"] > 0.9 and summary["best_checkpoint"]
    # the killed driver's MLflow run, continued: every epoch once (mlflow_history fails on a step
    # logged twice), the last as metrics.jsonl has it, and the test metrics
    tracking = json.loads((run_dir / "tracking.json").read_text())
    history = mlflow_history(tracking["mlflow_tracking_uri"], tracking["mlflow_run_id"])
    epochs = _epochs(run_dir)
    assert sorted(history["val/accuracy"]) == [e["steps_done"] for e in epochs]
    assert history["val/accuracy"][epochs[-1]["steps_done"]] == pytest.approx(epochs[-1]["val/accuracy"])
    assert history["test/accuracy"] == pytest.approx({epochs[-1]["steps_done"]: summary["test_accuracy"]})
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking["mlflow_tracking_uri"])
    assert [r.info.run_id for r in client.search_runs([client.get_run(tracking["mlflow_run_id"]).info.experiment_id])] \
        == [tracking["mlflow_run_id"]]  # fmt: skip
    assert main(["train", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "is not a run directory" in capsys.readouterr().out
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 2  # a finished run is not overwritten
    assert f"already holds a run: continue it with --resume {run_dir}" in capsys.readouterr().out


@pytest.mark.e2e
def test_two_nodes_one_worker_each_survive_a_lost_node(tmp_path, tiny_bert_dir):
    """A real two-node cluster (tests/two_node_cluster.py, in its own process: this one's Ray is
    the session's). Checkpoints on one machine's disk are refused before anything starts; with
    shared storage, one worker per node trains; a removed node (its worker process dies with it)
    costs one restart from the latest checkpoint, and the run still learns the task. (The
    script's `clean` scenario, the same run uninterrupted, and `kill`, a SIGKILLed worker process
    alone, run on request: python tests/two_node_cluster.py DIR PIPELINE clean kill.)"""
    pipeline = _pipeline(tmp_path, tiny_bert_dir, rows=800, scaling={
        "num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD",
    })  # fmt: skip
    script = Path(__file__).with_name("two_node_cluster.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(pipeline), "refused", "remove"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])

    refused = results["refused"]
    assert refused["code"] == 2 and not refused["run_dir_made"]
    assert "own disk" in refused["output"] and "the cluster has (or can grow to) 2 nodes" in refused["output"]

    run = results["remove"]
    assert run["code"] == 0 and run["hit_while_training"]
    assert run["restarts"] == 1 and run["restart_epochs"][0] >= 1  # from a checkpoint, not from scratch
    assert run["epochs_logged"] == [0, 1, 2] and run["test_accuracy"] > 0.9
    nodes_after_removal = {w["node_id"] for w in run["workers"]}  # one worker on each node
    assert nodes_after_removal == {results["head_node_id"], run["replacement_node_id"]}


@pytest.mark.e2e
def test_ctrl_c_stops_a_run_with_where_to_continue_and_leaves_no_ray_process(tmp_path, tiny_bert_dir):
    """SIGINT to the driver's process group, as a terminal sends Ctrl-C, once an epoch's checkpoint
    is registered: one line saying where to continue, exit 130, no traceback, and nothing of the
    run's own Ray (a local one, started by the driver) left running. That Ray's Train controller
    polls its workers every LOCAL_TRAIN_POLL_S, as the driver set it (the test session's own setting
    removed), and runs without the dashboard's modules or Train's preemption watcher (ray_env.ensure_ray)."""
    pipeline, run_dir = _pipeline(tmp_path, tiny_bert_dir, epochs=40), tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rayint-", dir="/tmp")  # names every process of this Ray
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    env["RAY_TMPDIR"] = ray_tmp
    driver = _driver_until_checkpoint(pipeline, run_dir, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with process_group(driver):
        assert _train_controllers_poll(ray_tmp) == [LOCAL_TRAIN_POLL_S]
        processes = _descendants(driver.pid)
        assert any("ray::RayTrainWorker" in p for p in processes)
        # a single run's Ray: neither the dashboard's modules nor Train's preemption watcher
        assert not [p for p in processes if p.startswith((DASHBOARD_MODULES, "ray::PreemptionWatcher"))], processes
        out = ctrl_c(driver, timeout=120)
    assert driver.returncode == 130, out[-3000:]
    assert "interrupted: the last checkpoint is " in out and f"continue with: finetune train --resume {run_dir}" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    time.sleep(2)  # processes of the stopped cluster exit on their own once their raylet is gone
    survivors = [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
                 if ray_tmp in line]  # fmt: skip
    assert survivors == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.e2e
def test_a_sweep_after_a_run_in_one_process_gets_a_ray_with_the_dashboard(tmp_path):
    """ensure_ray starts a single run's Ray without the dashboard; Tune's trials need it (Ray
    Train's placement-group cleaner asks its state API), so a later sweep in the same process
    (the Python API: train, then tune) restarts that Ray with it."""
    script = tmp_path / "lean.py"
    script.write_text(textwrap.dedent(f"""
        import contextlib, json, psutil, time
        from finetune.ray_env import ensure_ray

        def dashboard_processes():
            count = 0
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    count += " ".join(process.cmdline()).startswith({DASHBOARD_MODULES!r})
            return count

        seen = []
        for trials in (False, False, True, True):
            ensure_ray(trials=trials)
            deadline = time.time() + 20  # the dashboard forks its modules after ray.init returns
            while trials and not dashboard_processes() and time.time() < deadline:
                time.sleep(0.5)
            time.sleep(0 if trials else 3)
            seen.append(dashboard_processes())
        print(json.dumps(seen))
    """))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="raylean-", dir="/tmp")  # its own Ray, not one running here
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single, again, sweep, sweep_again = json.loads(done.stdout.splitlines()[-1])
    assert single == again == 0 and sweep >= 1 and sweep_again == sweep
