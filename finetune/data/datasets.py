"""Ray Data: sources, seeded splits and preprocessing as lazy `map_batches`, per split."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from finetune.ray_env import on_driver_node
from finetune.config import DataConfig
from finetune.data.preprocess import Preprocessor, preprocess
from finetune.data.rows import BadRowLog, DataError, RowPolicy
from finetune.data.sources import load_source
from finetune.data.splits import SPLITS
from finetune.tasks import task_class


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
    task: str = "classification"
    # a fixed sample of training rows, preprocessed as for evaluation (no augmentation): the
    # train_eval metrics and BatchNorm recalibration read it
    train_eval: ray.data.Dataset | None = None
    # data.long_text=windows: the training split's windows, unshuffled: counted once, when asked
    # (`finetune evaluate` and `export` read val and test only)
    train_windowed: ray.data.Dataset | None = None

    @cached_property
    def train_windows(self) -> int | None:
        """data.long_text=windows: the windows the training rows make (one tokenizing pass)."""
        return None if self.train_windowed is None else self.train_windowed.count()

    @property
    def training_rows(self) -> int:
        """The rows an epoch steps through: the training windows (data.long_text=windows) or rows."""
        return self.train_windows if self.train_windows is not None else self.train_rows

    def as_dict(self) -> dict[str, ray.data.Dataset]:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return splits if self.train_eval is None else {**splits, "train_eval": self.train_eval}

    def label_stats(self) -> dict:
        """What the training split's labels add up to, in one pass over the label column (per-block
        sums, added here): {"rows", "sums": per output, "squares"}. sums are rows per class
        (classification), positive rows per label (multi_label) or the sum of the target
        (regression, with its sum of squares)."""
        outputs = len(self.label_names)
        per_block = self.train_labels.map_batches(
            _label_sums, fn_kwargs={"task": self.task, "outputs": outputs}, batch_format="numpy"
        )
        rows, sums, squares = 0, np.zeros(outputs), 0.0
        for block in per_block.iter_rows():
            rows += int(block["rows"])
            sums += block["sums"]
            squares += float(block["squares"])
        return {"rows": rows, "sums": sums.tolist(), "squares": squares}

    def skipped_rows(self) -> dict:
        """{"counts": {split: rows}, "examples": [...]} of the rows dropped so far; empty when none."""
        if self.bad_row_log is None:
            return {}
        summary = ray.get(self.bad_row_log.summary.remote())
        return summary if summary["counts"] else {}


def _label_sums(batch: dict[str, np.ndarray], task: str, outputs: int) -> dict[str, np.ndarray]:
    labels = batch["label"]
    sums, squares = task_class(task).label_sums(labels, outputs)
    return {"rows": np.array([len(labels)]), "sums": sums[None].astype(np.float64), "squares": np.array([squares])}


def _check_carved_splits(cfg: DataConfig, splits: dict[str, ray.data.Dataset], train_rows: int) -> None:
    """A DataError for a validation or test share of `source` that drew no rows. Counted only where
    that can happen (a few dozen rows expected): a larger share is never empty, and counting reads
    the source once more."""
    kept = 1.0 - cfg.val_fraction - cfg.test_fraction
    for split in ("val", "test"):
        fraction = getattr(cfg, f"{split}_fraction")
        if getattr(cfg, f"{split}_source") or not fraction or train_rows * fraction / kept >= 50:
            continue
        if splits[split].count() == 0:
            raise DataError(f"{cfg.source}: its {split} share (data.{split}_fraction={fraction}) drew no rows of "
                            f"{train_rows} training rows; raise data.{split}_fraction, add rows, or give "
                            f"data.{split}_source")  # fmt: skip


def build_datasets(
    cfg: DataConfig, preprocessor: Preprocessor, seed: int, label_names: list[str] | None = None,
    task: str = "classification", train_eval_rows: int = 0,
) -> Datasets:  # fmt: skip
    """Train/val/test datasets ready for the model: model inputs plus `label`, encoded for `task`.
    `label_names`: a trained model's labels (evaluate); a label outside them is a DataError.
    `train_eval_rows`: about this many training rows, drawn with the seed (the same rows every
    epoch), preprocessed without augmentation as `Datasets.train_eval`; 0 = none."""
    log = BadRowLogActor.options(scheduling_strategy=on_driver_node()).remote() if cfg.on_bad_rows == "skip" else None
    policies = {split: RowPolicy(split, skip=log is not None, log=log) for split in SPLITS}
    source = load_source(cfg, seed, policies, label_names, task)
    if source.kind != preprocessor.kind:
        raise DataError(
            f"data.source {cfg.source} holds {source.kind} data but the model takes {preprocessor.kind}"
        )
    for_split = {"train": preprocessor, "val": preprocessor, "test": preprocessor}
    if cfg.augment:  # training rows only; validation and test see the plain resize
        for_split["train"] = replace(preprocessor, augment=tuple(spec.model_dump() for spec in cfg.augment))
    splits = dict(source.splits)
    train_rows = splits["train"].count()  # before preprocessing and shuffling, which a count would run
    _check_carved_splits(cfg, splits, train_rows)
    windowed = getattr(preprocessor, "long_text", None) == "windows"
    train_windowed = preprocess(splits["train"], preprocessor, policies["train"]) if windowed else None
    if cfg.shuffle == "full":  # a new seeded order each epoch (each execution of the dataset)
        splits["train"] = splits["train"].random_shuffle(seed=ray.data.RandomSeedConfig(seed, reseed_after_execution=True))
    ready = {split: preprocess(ds, for_split[split], policies[split]) for split, ds in splits.items()}
    train_labels = source.splits["train"].select_columns(["label"])
    train_eval = None
    if train_eval_rows and train_rows:
        # a training row skipped as bad is logged once, by the training split itself
        # shuffled (a folder's rows come class by class, and a worker reads only the first rows of its
        # share) and held in the object store, so that every epoch sees the same rows in the same order;
        # a few hundred raw rows (texts, image bytes or paths), shuffled here rather than by a Ray
        # Data all-to-all shuffle, which costs seconds of task start-up on a small machine
        sample = source.splits["train"].random_sample(min(1.0, train_eval_rows / train_rows), seed=seed)
        tables = [ray.get(ref) for ref in sample.to_arrow_refs()]
        if tables:
            table = pa.concat_tables(tables)
            sample = ray.data.from_arrow(table.take(np.random.default_rng(seed).permutation(table.num_rows)))
        train_eval = preprocess(sample, preprocessor, RowPolicy("train", skip=log is not None, log=None))
    return Datasets(
        ready["train"], ready["val"], ready["test"], source.label_names, train_rows, log, train_labels, task, train_eval,
        train_windowed,
    )
