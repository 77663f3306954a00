"""A run's files survive a kill or a full disk at any moment: the previous good version stays
readable (finetune/files.py), and a torn last line of metrics.jsonl is left out on --resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from finetune import files
from finetune.training.driver import _ray_run


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], **kwargs)


def test_a_full_disk_leaves_the_previous_file_and_folder(tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`) makes every write past 64 KiB fail as a full disk does (EFBIG)."""
    summary, best = tmp_path / "summary.json", tmp_path / "best"
    files.write_text(summary, json.dumps({"epoch": 1}))
    files.replace_dir(best, lambda folder: (folder / "model.safetensors").write_bytes(b"old weights"))
    done = _python(f"""
        import resource, signal, json
        from pathlib import Path
        from finetune import files
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write raises instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        failures = []
        try:
            files.write_text({str(summary)!r}, json.dumps({{"epoch": 2, "pad": "x" * 200_000}}))
        except OSError as error:
            failures.append(error.errno)
        try:
            files.replace_dir({str(best)!r}, lambda f: (f / "model.safetensors").write_bytes(b"w" * 200_000))
        except OSError as error:
            failures.append(error.errno)
        print(json.dumps(failures))
    """, stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = done.communicate(timeout=60)
    assert done.returncode == 0 and len(json.loads(out)) == 2  # both writes failed (EFBIG)
    assert json.loads(summary.read_text()) == {"epoch": 1}
    assert (best / "model.safetensors").read_bytes() == b"old weights"
    # no partial files left: best (a link) and the version it names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", os.readlink(best), "summary.json"])


def test_a_kill_mid_write_leaves_a_readable_file(tmp_path):
    """A writer SIGKILLed at arbitrary moments while it rewrites a 2 MB file and a folder: every
    time, each holds one whole version."""
    summary, best = tmp_path / "summary.json", tmp_path / "best"
    for attempt in range(6):
        # the last attempt's files, best/ (a link) and the versions it named: a link left behind
        # would count as this attempt's first version and the kill could come before any write
        for leftover in tmp_path.iterdir():
            if leftover.is_symlink() or leftover.is_file():
                leftover.unlink()
            else:
                shutil.rmtree(leftover)
        writer = _python(f"""
            import json
            from finetune import files
            for version in range(10**6):
                files.write_text({str(summary)!r}, json.dumps({{"version": version, "pad": "x" * 2_000_000}}))
                files.replace_dir({str(best)!r}, lambda f: [(f / n).write_text(f"{{version}}\\n" * 100_000) for n in "ab"])
        """)  # fmt: skip
        deadline = time.time() + 60
        while not (best / "b").exists() and time.time() < deadline:  # the first versions are written
            time.sleep(0.05)
        time.sleep(0.07 * attempt)  # then a kill at a different moment each time
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert len(json.loads(summary.read_text())["pad"]) == 2_000_000
        a, b = (best / "a").read_text(), (best / "b").read_text()
        assert a == b and len(a.splitlines()) == 100_000 and len(set(a.splitlines())) == 1  # both of one version


def test_a_torn_last_line_is_left_out(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    files.append_line(metrics, json.dumps({"epoch": 0, "val/accuracy": 0.6}))
    files.append_line(metrics, json.dumps({"epoch": 1, "val/accuracy": 0.7}))
    with open(metrics, "a") as handle:
        handle.write('{"epoch": 2, "val/acc')  # the driver was killed here
    assert [r["epoch"] for r in files.read_json_lines(metrics)] == [0, 1]
    metrics.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(json.JSONDecodeError):  # a torn line in the middle is not a kill's trace
        files.read_json_lines(metrics)


def test_each_new_run_has_its_own_ray_train_run(tmp_path):
    """Ray Train continues any run of the same name and storage: a new run never reuses one (same
    folder name, a deleted and rerun folder, the same second); --resume reads its own."""
    run_dir, storage = tmp_path / "run", str(tmp_path / "shared-storage")
    names = {_ray_run(run_dir, storage, resume=False)[0] for _ in range(50)}
    assert len(names) == 50 and all(name.startswith("run-") for name in names)
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"ray_run_name": "run-1234abcd", "storage_path": "s3://bucket/runs"}))
    assert _ray_run(run_dir, storage, resume=True) == ("run-1234abcd", "s3://bucket/runs")
    (run_dir / "run.json").unlink()  # a run folder from before run.json
    assert _ray_run(run_dir, storage, resume=True) == ("run", storage)
