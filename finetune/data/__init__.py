"""Ray Data: sources, seeded splits and preprocessing as lazy `map_batches`."""

from __future__ import annotations

from dataclasses import dataclass

import ray.data

from finetune.config import DataConfig
from finetune.data.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor, preprocess, trim_padding
from finetune.data.sources import CATALOG, DataError, check_source, load_source


@dataclass
class Datasets:
    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    label_names: list[str]

    def as_dict(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train, "val": self.val, "test": self.test}


def build_datasets(cfg: DataConfig, preprocessor: Preprocessor, seed: int) -> Datasets:
    """Train/val/test datasets ready for the model: model inputs plus an integer `label`."""
    source = load_source(cfg, seed)
    if source.kind != preprocessor.kind:
        raise DataError(
            f"data.source {cfg.source} holds {source.kind} data but the model takes {preprocessor.kind}"
        )
    ready = {split: preprocess(ds, preprocessor) for split, ds in source.splits.items()}
    return Datasets(ready["train"], ready["val"], ready["test"], source.label_names)


__all__ = [
    "CATALOG",
    "DataError",
    "Datasets",
    "ImagePreprocessor",
    "Preprocessor",
    "TextPreprocessor",
    "build_datasets",
    "check_source",
    "load_source",
    "trim_padding",
]
