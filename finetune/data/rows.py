"""Bad rows: where a row came from, and what happens to one that cannot be used.

File sources (and the builtin rotten_tomatoes, as if one file) carry two provenance columns
through reading and splitting: `__file` and `__row` (0-based row number in that file; -1 for a
file that is one image). A row with an
empty label, no text, or an image that does not decode either stops the run with a
`DataError` naming file and row (`data.on_bad_rows: error`) or is dropped and logged to a
`BadRowLog` actor (`skip`), which the driver asks for the counts at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FILE, ROW = "__file", "__row"
PROVENANCE = (FILE, ROW)


class DataError(ValueError):
    """Input data that cannot be used as configured (missing file or column, bad labels)."""


class BadRows(Exception):
    """Raised by a preprocessor for the rows of its batch it cannot use: {index: reason}."""

    def __init__(self, rows: dict[int, str]):
        super().__init__("; ".join(f"row {i}: {reason}" for i, reason in rows.items()))
        self.rows = rows


def where(batch: dict[str, np.ndarray], index: int) -> str:
    if FILE not in batch:
        return f"row {index} of a batch"
    row = int(batch[ROW][index])
    return str(batch[FILE][index]) + (f", row {row}" if row >= 0 else "")


class BadRowLog:
    """Skipped rows per split, each counted once however many epochs read it. Runs as a
    0-CPU Ray actor (`build_datasets` starts it) that every preprocessing task reports to."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}

    def add(self, split: str, rows: dict[str, str]) -> None:
        self.rows.setdefault(split, {}).update(rows)

    def summary(self) -> dict[str, Any]:
        examples = [f"{key}: {reason}" for rows in self.rows.values() for key, reason in list(rows.items())[:3]]
        return {"counts": {split: len(rows) for split, rows in self.rows.items()}, "examples": examples[:5]}


@dataclass(frozen=True)
class RowPolicy:
    """data.on_bad_rows for one split; picklable, so Ray Data tasks carry it."""

    split: str
    skip: bool = False
    log: Any = None  # BadRowLog handle when skipping

    def drop(self, batch: dict[str, np.ndarray], bad: dict[int, str]) -> dict[str, np.ndarray]:
        """`batch` without the rows in `bad` (index -> reason), or a DataError for the first."""
        if not bad:
            return batch
        if not self.skip:
            index, reason = next(iter(bad.items()))
            raise DataError(f"{where(batch, index)}: {reason} (set data.on_bad_rows=skip to drop such rows)")
        if self.log is not None:
            import ray

            # Waited for, so that the count is complete when the pass that dropped the rows ends
            # (only batches with bad rows pay the round trip).
            ray.get(self.log.add.remote(self.split, {where(batch, i): reason for i, reason in bad.items()}))
        keep = np.ones(len(next(iter(batch.values()))), dtype=bool)
        keep[list(bad)] = False
        return {name: column[keep] for name, column in batch.items()}


def find_data_error(error: BaseException) -> DataError | None:
    """The DataError behind an exception, also when Ray wrapped it in task, actor or worker errors.

    Across actor boundaries (Ray Data's split coordinator) Ray keeps only the formatted
    traceback of the original exception, so its text is searched as a last resort.
    """
    seen, chain = set(), []
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError):
            # a failed Ray task's error is also an instance of its cause's class; its text is the traceback
            # (whose message Ray Data extends with its retry advice: the first line is ours)
            cause = getattr(current, "cause", None)
            error = cause if isinstance(cause, DataError) else current
            return DataError(str(error).splitlines()[0]) if "\n" in str(error) else error
        chain.append(current)
        stack += [current.__cause__, current.__context__, *getattr(current, "worker_failures", {}).values()]
    for current in chain:
        for line in str(current).splitlines():
            _, marker, message = line.partition("DataError: ")
            if marker and message.strip():
                return DataError(message.strip())
    return None
