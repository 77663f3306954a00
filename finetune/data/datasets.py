"""Ray Data: sources, seeded splits and preprocessing as lazy `map_batches`, per split."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import ray.data

from finetune.cluster import on_driver_node
from finetune.config import DataConfig
from finetune.data.preprocess import Preprocessor, preprocess
from finetune.data.rows import BadRowLog, DataError, RowPolicy
from finetune.data.sources import load_source
from finetune.data.splits import SPLITS


# the skipped-row log every preprocessing task reports to (0 CPUs: it only counts)
BadRowLogActor = ray.remote(num_cpus=0)(BadRowLog)


@dataclass
class Datasets:
    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    label_names: list[str]
    train_rows: int  # counted before preprocessing: rows whose image fails to decode are still in
    bad_row_log: Any = None  # BadRowLog actor when data.on_bad_rows=skip
    train_labels: ray.data.Dataset | None = None  # the training split's encoded labels, before preprocessing

    def as_dict(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def label_counts(self) -> dict[str, int]:
        """Training rows per label (one pass over the label column: per-block counts, summed here)."""
        per_block = self.train_labels.map_batches(_count_labels, batch_format="numpy")
        counts = dict.fromkeys(self.label_names, 0)
        for row in per_block.iter_rows():
            counts[self.label_names[int(row["label"])]] += int(row["count"])
        return counts

    def skipped_rows(self) -> dict:
        """{"counts": {split: rows}, "examples": [...]} of the rows dropped so far; empty when none."""
        if self.bad_row_log is None:
            return {}
        summary = ray.get(self.bad_row_log.summary.remote())
        return summary if summary["counts"] else {}


def _count_labels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    labels, counts = np.unique(batch["label"], return_counts=True)
    return {"label": labels, "count": counts}


def build_datasets(
    cfg: DataConfig, preprocessor: Preprocessor, seed: int, label_names: list[str] | None = None
) -> Datasets:
    """Train/val/test datasets ready for the model: model inputs plus an integer `label`.
    `label_names`: a trained model's labels (evaluate); a label outside them is a DataError."""
    log = BadRowLogActor.options(scheduling_strategy=on_driver_node()).remote() if cfg.on_bad_rows == "skip" else None
    policies = {split: RowPolicy(split, skip=log is not None, log=log) for split in SPLITS}
    source = load_source(cfg, seed, policies, label_names)
    if source.kind != preprocessor.kind:
        raise DataError(
            f"data.source {cfg.source} holds {source.kind} data but the model takes {preprocessor.kind}"
        )
    for_split = {"train": preprocessor, "val": preprocessor, "test": preprocessor}
    if cfg.augment:  # training rows only; validation and test see the plain resize
        for_split["train"] = replace(preprocessor, augment=tuple(spec.model_dump() for spec in cfg.augment))
    splits = dict(source.splits)
    train_rows = splits["train"].count()  # before preprocessing and shuffling, which a count would run
    if cfg.shuffle == "full":  # a new seeded order each epoch (each execution of the dataset)
        splits["train"] = splits["train"].random_shuffle(seed=ray.data.RandomSeedConfig(seed, reseed_after_execution=True))
    ready = {split: preprocess(ds, for_split[split], policies[split]) for split, ds in splits.items()}
    train_labels = source.splits["train"].select_columns(["label"])
    return Datasets(ready["train"], ready["val"], ready["test"], source.label_names, train_rows, log, train_labels)
