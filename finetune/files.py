"""Writing a run's files so that a kill or a full disk at any moment leaves the previous good
version readable: each file is written beside its destination and renamed over it (a rename
within one folder is atomic on POSIX file systems); a folder is built beside its destination
and swapped in."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    """`path` holds `text`, or (after a failure at any point) what it held before."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def append_line(path: str | Path, line: str) -> None:
    """One line added with a single write, synced: a kill can tear only this line, which
    `read_json_lines` then leaves out."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_json_lines(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file this tool appends to; a torn last line (the writer
    was killed mid-line) is left out, a torn line elsewhere is an error."""
    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).is_file() else []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


def replace_dir(destination: str | Path, fill: Callable[[Path], None]) -> None:
    """`destination` becomes the folder `fill(folder)` writes, swapped in only once it is complete."""
    destination = Path(destination)
    token = uuid.uuid4().hex[:8]
    building = destination.with_name(f".{destination.name}.{token}.partial")
    retired = destination.with_name(f".{destination.name}.{token}.old")
    try:
        building.mkdir(parents=True)
        fill(building)
        if destination.exists():
            destination.rename(retired)
        building.rename(destination)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if retired.exists() and not destination.exists():
            retired.rename(destination)  # the previous version stays
        raise
    shutil.rmtree(retired, ignore_errors=True)
