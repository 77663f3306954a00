"""Labels of a file source: discovered in the training split (ordered: numbers as numbers,
text alphabetically) and encoded for the task (`finetune/tasks/`), an empty label a bad row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray.data

from finetune.data.rows import DataError, RowPolicy
from finetune.tasks import Task, task_class


def _distinct_labels(batch: pd.DataFrame, task: str, delimiter: str) -> dict[str, list]:
    kind = task_class(task)
    values = kind.names_in([v for v in batch["label"] if not kind.is_empty(v)], delimiter)
    return {"label": pd.unique(pd.Series(values, dtype=object))}


def _names(ds: ray.data.Dataset, task: str, delimiter: str) -> set:
    """The distinct label names of `ds` (empty labels left out: they are bad rows)."""
    # Distinct labels per block, merged here: a plain map (no shuffle stage as in
    # Dataset.unique), which also runs inside a Tune trial's placement group.
    distinct = ds.select_columns(["label"]).map_batches(
        _distinct_labels, fn_kwargs={"task": task, "delimiter": delimiter}, batch_format="pandas"
    )
    values = {v.item() if isinstance(v, np.generic) else v for v in distinct.to_pandas()["label"]}
    return {v for v in values if not Task.is_empty(v)}


def discover_labels(ds: ray.data.Dataset, source: str, task: str, delimiter: str) -> list[str]:
    """The ordered label names; empty labels are bad rows, reported (or skipped) by file and row."""
    values = _names(ds, task, delimiter)
    if not values:
        raise DataError(f"{source}: no rows with a label")
    # Numeric labels sort as numbers (2 before 10), text labels alphabetically.
    ordered = sorted(values) if all(isinstance(v, (int, np.integer)) for v in values) else sorted(map(str, values))
    names = [str(v) for v in ordered]
    if problem := task_class(task).label_names_problem(names):
        raise DataError(f"{source}: {problem}")
    return names


def check_known_labels(ds: ray.data.Dataset, label_names: list[str], source: str, task: str, delimiter: str) -> None:
    """A DataError for a label of `ds` (a validation or test file) the training split does not
    have, before training starts rather than at the first evaluation."""
    unknown = sorted(str(v) for v in _names(ds, task, delimiter) if str(v) not in set(label_names))
    if unknown:
        raise DataError(f"{source}: label {unknown[0]!r} is not one of the training labels {label_names}")


def encode_labels(
    ds: ray.data.Dataset, label_names: list[str], source: str, policy: RowPolicy, task: str, delimiter: str
) -> ray.data.Dataset:
    kind = task_class(task)
    known = set(label_names)

    def check_known(names) -> None:
        unknown = next((name for name in names if name not in known), None)
        if unknown is not None:
            raise DataError(f"{source}: label {unknown!r} is not one of the training labels {label_names}")

    def encode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        problems = {i: kind.label_problem(value) for i, value in enumerate(batch["label"])}
        batch = policy.drop(batch, {i: problem for i, problem in problems.items() if problem})
        batch["label"] = kind.encode(batch["label"], label_names, delimiter, check_known)
        return batch

    return ds.map_batches(encode, batch_format="numpy")
