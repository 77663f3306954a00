"""A pipeline's rows on the driver, as plain Python: what the yardstick fits and scores and what the
token-length check samples. The same source, seed and splits as the run's own datasets
(`load_source`), so the rows are the rows the model trains, validates and tests on; a row the
model's preprocessing would reject (no text) is left out here without a word: the run itself
reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray.data

from finetune.config import DataConfig
from finetune.data.rows import RowPolicy
from finetune.data.sources import load_source
from finetune.data.splits import SPLITS


@dataclass
class LocalRows:
    inputs: list  # texts, or images (bytes, paths or Hugging Face-style dicts)
    labels: np.ndarray  # encoded for the task, as the model's targets
    total: int  # rows of the split; more than len(inputs) where they were sampled (or rows dropped)

    @property
    def sampled(self) -> bool:
        return self.total > len(self.inputs)


def local_datasets(cfg: DataConfig, seed: int, label_names: list[str] | None, task: str,
                   max_rows: dict[str, int | None]) -> tuple[str, dict[str, tuple[ray.data.Dataset, int]]]:  # fmt: skip
    """The source's kind ("text" or "image") and, for each split named in `max_rows`, its input and
    label columns as a Ray Dataset of at most `max_rows[split]` rows (drawn with the seed; None =
    every row) with the split's row count. `label_names`: None = discovered in the training split.
    Bad labels are dropped silently here: the run's own read says so."""
    policies = {split: RowPolicy(split, skip=True, log=None) for split in SPLITS}
    source = load_source(cfg, seed, policies, label_names, task)
    column = "text" if source.kind == "text" else "image"
    out = {}
    for split, limit in max_rows.items():
        ds = source.splits[split].select_columns([column, "label"])
        total = ds.count()
        if limit is not None and total > limit:
            # a little over the share, then cut: random_sample draws each row independently
            ds = ds.random_sample(min(1.0, 1.1 * limit / total), seed=seed).limit(limit)
        out[split] = (ds, total)
    return source.kind, out


def local_splits(cfg: DataConfig, seed: int, label_names: list[str] | None, task: str,
                 max_rows: dict[str, int | None]) -> tuple[str, dict[str, LocalRows]]:  # fmt: skip
    """`local_datasets`' rows read into the driver's memory (rows without input left out)."""
    kind, datasets = local_datasets(cfg, seed, label_names, task, max_rows)
    return kind, {split: read_rows(ds, kind, total) for split, (ds, total) in datasets.items()}


def read_rows(ds: ray.data.Dataset, kind: str, total: int) -> LocalRows:
    """A `local_datasets` split in the driver's memory (rows without input left out)."""
    column = "text" if kind == "text" else "image"
    inputs, labels = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        keep = [i for i, value in enumerate(batch[column]) if _usable(value)]
        inputs.extend(batch[column][i] for i in keep)
        labels.extend(batch["label"][i] for i in keep)
    return LocalRows(inputs, np.asarray(np.stack(labels) if labels and np.ndim(labels[0]) else labels), total)


def _usable(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, float):
        return value == value  # NaN: no input
    return value is not None
