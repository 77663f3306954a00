"""Ray Jobs on a cluster: `finetune submit` ships a pipeline and this package; `finetune jobs`
reads a job's status and logs, or stops it.

The job's working directory (Ray's runtime_env `working_dir`) holds the pipeline file and a
copy of the `finetune` package the client runs, so the cluster runs the code that was
submitted; the cluster's Python environment provides the dependencies (cluster/ installs them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from ray.job_submission import JobStatus, JobSubmissionClient

from finetune.config import ConfigError

PACKAGE = Path(__file__).parent  # this module lives in the package it ships
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # a head on this machine


def _auth_headers() -> dict[str, str]:
    """Ray's token auth: the token in $RAY_AUTH_TOKEN or ~/.ray/auth_token, as a bearer token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def insecure_token_problem(address: str, headers: dict[str, str]) -> str | None:
    """Why sending the cluster token to `address` would expose it: plain http to another machine
    (anyone on the path reads a bearer token); None for https, loopback, or no token."""
    url = urlsplit(address if "://" in address else f"http://{address}")
    if not headers or url.scheme != "http":
        return None
    host = url.hostname or ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return (f"--address {address}: the cluster token would travel over plain http to {host}; use an https:// address "
            "(a TLS proxy in front of the dashboard, or an SSH tunnel to 127.0.0.1), or pass --allow-insecure")


def client(address: str | None, allow_insecure: bool = False) -> JobSubmissionClient:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    headers = _auth_headers()
    if not allow_insecure and (problem := insecure_token_problem(address, headers)):
        raise ConfigError([problem])
    return JobSubmissionClient(address, headers=headers)


def entrypoint(command: str, pipeline: str, overrides: list[str], extra: list[str]) -> str:
    return shlex.join(["python", "-m", "finetune.cli", command, pipeline, *overrides, *extra])


def submit(
    pipeline: Path, overrides: list[str], *, address: str | None, tune: bool = False, extra: list[str] = (),
    allow_insecure: bool = False,
) -> tuple[JobSubmissionClient, str]:  # fmt: skip
    """Submit `finetune train|tune PIPELINE overrides` as a Ray job; returns the client and job id."""
    jobs = client(address, allow_insecure)
    with tempfile.TemporaryDirectory(prefix="finetune-job-") as staging:
        staging = Path(staging)
        shutil.copytree(PACKAGE, staging / "finetune",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        shutil.copy(pipeline, staging / pipeline.name)
        command = entrypoint("tune" if tune else "train", pipeline.name, overrides, list(extra))
        # The upload happens inside submit_job, while the staging folder still exists.
        job_id = jobs.submit_job(
            entrypoint=command,
            runtime_env={"working_dir": str(staging)},
            metadata={"pipeline": pipeline.name, "command": "tune" if tune else "train"},
        )
    return jobs, job_id


async def _follow(jobs: JobSubmissionClient, job_id: str, out) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def follow(jobs: JobSubmissionClient, job_id: str, out=None) -> JobStatus:
    """Print the job's logs as they come until it ends (to `out`, default: the current
    sys.stdout, looked up at the call); returns its final status."""
    asyncio.run(_follow(jobs, job_id, out or sys.stdout))
    return jobs.get_job_status(job_id)


def exit_status(status: JobStatus) -> int:
    return 0 if status == JobStatus.SUCCEEDED else 1
