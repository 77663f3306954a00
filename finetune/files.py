"""Writing a run's files so that a kill or a full disk at any moment leaves the previous good
version readable: each file is written beside its destination and renamed over it (a rename
within one folder is atomic on POSIX file systems); a folder is built beside its destination
and swapped in (a link renamed over the old one)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    """`path` holds `text`, or (after a failure at any point) what it held before."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """`path` holds `data`, or (after a failure at any point) what it held before."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
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
    """`destination` becomes the folder `fill(folder)` writes, swapped in only once it is complete.
    `destination` is a link to a hidden versioned folder beside it: replacing a link is one atomic
    rename, so at every moment it names a whole version (two folder renames would leave a moment
    with none)."""
    destination = Path(destination)
    token = uuid.uuid4().hex[:8]
    version = destination.with_name(f".{destination.name}.{token}")
    link = destination.with_name(f".{destination.name}.{token}.link")
    previous = os.readlink(destination) if destination.is_symlink() else None
    try:
        version.mkdir(parents=True)
        fill(version)
        os.symlink(version.name, link)  # relative: the run folder can move
        if destination.is_dir() and not destination.is_symlink():  # a folder written before links: set aside once
            destination.rename(destination.with_name(f".{destination.name}.{token}.old"))
        os.replace(link, destination)
    except BaseException:
        link.unlink(missing_ok=True)
        shutil.rmtree(version, ignore_errors=True)
        raise
    for leftover in (previous and destination.parent / previous, destination.with_name(f".{destination.name}.{token}.old")):
        if leftover:
            shutil.rmtree(leftover, ignore_errors=True)
