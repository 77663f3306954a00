"""What a user's terminal shows: `finetune train` as a user runs it, in a process of its own that
starts its own embedded Ray (no RAY_ADDRESS), with everything it prints read back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

from helpers import tiny_sentiment_pipeline

# what Python's warnings module prints, and Ray's own WARNING log lines
WARNING_LINE = re.compile(r"(Warning:|\bWARNING\b|Traceback \(most recent call last\))")


@pytest.mark.e2e
def test_a_run_on_its_own_ray_prints_no_ray_warning_and_says_what_it_is_doing(tmp_path, tiny_bert_dir):
    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=240, train={"epochs": 1, "train_eval_rows": 64})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's shell: no Ray settings
    # its own temp dir, short (Ray's socket paths must fit 107 bytes): the embedded Ray registers
    # nowhere another test's Ray would look
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:
        env.update(RAY_TMPDIR=ray_tmp, COLUMNS="160")
        done = subprocess.run([sys.executable, "-m", "finetune.cli", "train", str(pipeline), "--run-dir", str(tmp_path / "run")],
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    assert [line for line in printed.splitlines() if WARNING_LINE.search(line)] == []
    # the steps that take a while name themselves as they start
    for step in ("starting Ray", "reading the data", "writing the report"):
        assert step in printed, step
    assert f"report: {tmp_path / 'run' / 'report.html'}" in printed.replace("\n", "")
