"""`finetune submit` / `finetune jobs` against a real Ray head started on loopback for the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import ctrl_c, process_group, WARM_WORKERS, tiny_sentiment_pipeline
from finetune.cli import main
from finetune.training.driver import checkpoint_folder


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _stop_jobs(address: str) -> None:
    from finetune import jobs

    try:
        client = jobs.client(address)
        for job in client.list_jobs():
            if not job.status.is_terminal():
                client.stop_job(job.submission_id)
                deadline = time.time() + 30
                while not client.get_job_status(job.submission_id).is_terminal() and time.time() < deadline:
                    time.sleep(0.5)
    except Exception:  # noqa: BLE001 - a head that never came up has no jobs
        pass


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with its own ports and temp dir; stopped by the test."""
    gcs, dashboard, client, agent = _free_ports(4)
    temp_dir = tmp_path_factory.mktemp("head")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # jobs run this venv's python
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--num-cpus=2",
         "--disable-usage-stats", f"--system-config={json.dumps(WARM_WORKERS)}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError as error:
                if "401" in str(error) or "Unauthorized" in str(error):
                    break  # up, and asking for the token, as it should
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail(f"the Ray head did not come up at {address}")
                time.sleep(1)
        yield address
    finally:
        _stop_jobs(address)  # job drivers run in their own process groups and outlive the head
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _job_pipeline(tmp_path: Path, tiny_bert_dir: Path, **sections) -> Path:
    return tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=200, name="job", **{"train": {"epochs": 1}, **sections})


@pytest.mark.e2e
def test_submit_waits_for_the_job_and_its_checkpoint_lands_in_storage(ray_head, tmp_path, tiny_bert_dir, capsys):
    pipeline = _job_pipeline(tmp_path, tiny_bert_dir)
    storage, run_dir = tmp_path / "storage", tmp_path / "run"
    code = main(["submit", str(pipeline), f"checkpoint.storage_path={storage}", "--address", ray_head,
                 "--run-dir", str(run_dir), "--wait"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = out.split("submitted job ", 1)[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in out
    assert "finetune summary" in out and "test accuracy" in out  # the job's own log, followed
    assert checkpoint_folder(run_dir).parent == storage and checkpoint_folder(run_dir).name.startswith("run-")
    assert len([p for p in checkpoint_folder(run_dir).glob("checkpoint_*") if p.is_dir()]) == 1  # the one epoch's
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "summary.json").is_file()

    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", ray_head]) == 0
    assert "best model:" in capsys.readouterr().out


@pytest.mark.e2e
def test_submit_tune_runs_the_sweep_on_the_cluster_and_jobs_stop_ends_a_job(ray_head, tmp_path, tiny_bert_dir, capsys):
    pipeline = _job_pipeline(tmp_path, tiny_bert_dir, tune={
        "search_space": {"optim.lr": {"choice": [1e-3, 3e-3]}}, "num_samples": 1, "scheduler": {"name": "fifo"},
    })  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    assert main(["submit", str(pipeline), "--tune", "--address", ray_head, "--sweep-dir", str(sweep_dir), "--wait"]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "best.yaml" in out  # the sweep's own report, followed
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 1 and summary["best"]["params"]["optim.lr"] in (1e-3, 3e-3)
    assert (sweep_dir / "best.yaml").is_file() and (sweep_dir / "results.csv").is_file()

    # Ctrl-C while `submit --wait` follows a job stops the following, not the job.
    follower = subprocess.Popen([sys.executable, "-m", "finetune.cli", "submit", str(pipeline), "train.epochs=50",
                                 "--address", ray_head, "--run-dir", str(tmp_path / "long"), "--wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    with process_group(follower):
        lines = iter(follower.stdout.readline, "")
        job_id = next(line for line in lines if "submitted job " in line).split("submitted job ", 1)[1].split()[0]
        # Stopped while running (a job stopped while still PENDING may start its driver anyway: Ray's race).
        assert _wait_for_status(job_id, ray_head, capsys, "RUNNING")
        out = ctrl_c(follower, timeout=60)
    assert follower.returncode == 130, out[-2000:]
    assert f"stopped following job {job_id}; it keeps running on the cluster" in out
    assert f"stop it with: finetune jobs stop {job_id}" in out and "Traceback" not in out
    assert _wait_for_status(job_id, ray_head, capsys, "RUNNING", timeout=5)
    assert main(["jobs", "stop", job_id, "--address", ray_head]) == 0
    assert f"{job_id}: stop requested" in capsys.readouterr().out
    assert _wait_for_status(job_id, ray_head, capsys, "STOPPED")


def _wait_for_status(job_id: str, address: str, capsys, wanted: str, timeout: float = 90) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert main(["jobs", "status", job_id, "--address", address]) == 0
        if f"{job_id}: {wanted}" in capsys.readouterr().out:
            return True
        time.sleep(1)
    return False


def test_submit_refuses_a_bad_pipeline_before_contacting_the_cluster(tmp_path, capsys):
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_text(yaml.safe_dump({"data": {"source": "rotten_tomatoes"}, "model": {"name": "minilm-l6"},
                                        "optim": {"lr": -1}}))  # fmt: skip
    assert main(["submit", str(pipeline), "--address", "http://127.0.0.1:9"]) == 2
    assert "optim.lr" in capsys.readouterr().out


def test_the_cluster_token_never_travels_over_plain_http_to_another_machine(tmp_path, capsys, monkeypatch):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"data": {"source": "rotten_tomatoes"}, "model": {"name": "minilm-l6"}}))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token")
    for command in (["submit", str(pipeline)], ["jobs", "status", "raysubmit_1"]):
        assert main([*command, "--address", "http://10.1.2.3:8265"]) == 2
        assert ("--address http://10.1.2.3:8265: the cluster token would travel over plain http to 10.1.2.3; use an "
                "https:// address") in capsys.readouterr().out  # fmt: skip
    from finetune.jobs import insecure_token_problem

    token = {"Authorization": "Bearer secret-token"}
    for fine in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://ray.example.com"):
        assert insecure_token_problem(fine, token) is None, fine
    assert insecure_token_problem("http://10.1.2.3:8265", {}) is None  # no token, nothing to expose
    assert insecure_token_problem("10.1.2.3:8265", token)  # no scheme: Ray's client takes it as http
