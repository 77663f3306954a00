"""The local Ray a command starts for itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

PROBE = """
import os, ray
from finetune.ray_env import ensure_ray
ensure_ray()
print(ray.get(ray.remote(lambda: os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")).remote()))
"""


@pytest.mark.e2e
def test_a_local_ray_has_its_train_controller_poll_every_half_second():
    """Ray's processes (the Train controller among them) are children of the raylet that
    ensure_ray starts, and see the setting it makes (a user's own value would win)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    env["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="raypoll-", dir="/tmp")  # short: Ray's socket paths
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0.5"]
