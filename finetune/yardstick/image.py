"""The image yardstick: a linear probe on the pretrained model's frozen features. The features
(the input of the model's new head, BatchNorm in eval mode: what `linear_probe` trains on) are
computed once per data and model and cached on the driver's disk, so a second run on the same
images (another learning rate, another strategy) fits its yardstick in seconds. The linear model
(yardstick/linear.py) is fit on standardised features; the standardisation is then folded into
it, so the yardstick is the pretrained model with a fitted head: an ordinary saved model."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import ray.data
import torch
from torch import nn

from finetune import files
from finetune.config import PipelineConfig
from finetune.data.preprocess import preprocess
from finetune.data.rows import RowPolicy
from finetune.tasks import Task
from finetune.training import steps
from finetune.yardstick.linear import MODELS, fit_linear, linear_outputs

DESCRIPTION = "a linear probe on the pretrained model's frozen features ({model})"
BATCH = 128  # images per forward pass while computing features


def cache_dir() -> Path:
    """Where features are kept between runs: $FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"]) / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "features"


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    from finetune.models.vision import classifier_head_name

    name = classifier_head_name(model)
    return name, model.get_submodule(name)


def _cache_key(cfg: PipelineConfig, split: str, max_rows: int | None) -> str:
    """Changes with anything that changes the split's features: the model, the image size, the data
    settings and seed, and each source file's size and modification time."""
    stats = []
    for source in (cfg.data.source, cfg.data.val_source, cfg.data.test_source):
        path = Path(source).expanduser() if source else None
        if path is None or not path.exists():
            stats.append(source)
            continue
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        stats.append([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in found if f.is_file()])
    described = json.dumps({"model": cfg.model.model_dump(mode="json", include={"name", "weights"}),
                            "data": cfg.data.model_dump(mode="json", exclude={"augment", "mixup_alpha", "cutmix_alpha"}),
                            "seed": cfg.train.seed, "split": split, "max_rows": max_rows, "files": stats},
                           sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(described.encode()).hexdigest()[:24]


@torch.no_grad()
def _features(backbone: nn.Module, ds: ray.data.Dataset, precision: str) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device("cpu")
    features, labels = [], []
    for batch in ds.iter_torch_batches(batch_size=BATCH):
        with steps.autocast(precision, device):
            features.append(backbone(pixel_values=batch["pixel_values"]).float().numpy())
        labels.append(batch["label"].numpy())
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros(0)
    return np.concatenate(features), np.concatenate(labels)


def split_features(cfg: PipelineConfig, backbone: nn.Module, preprocessor, datasets: dict, max_rows: int | None,
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """(features, labels) per split, from the cache when this data and model have been seen before."""
    precision = steps.resolve_precision(cfg.train.precision, torch.device("cpu"))
    out = {}
    for split, (ds, _) in datasets.items():
        cached = cache_dir() / f"{_cache_key(cfg, split, max_rows)}.npz"
        if cached.is_file():
            with np.load(cached, allow_pickle=False) as saved:
                out[split] = (saved["features"], saved["labels"])
            continue
        ready = preprocess(ds, preprocessor, RowPolicy(split, skip=True, log=None))
        out[split] = _features(backbone, ready, precision)
        cached.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, features=out[split][0], labels=out[split][1])
        files.write_bytes(cached, buffer.getvalue())
    return out


def fit(cfg: PipelineConfig, task: Task, datasets: dict, metric: str, max_rows: int | None):
    """The probe: (the pretrained model with the fitted head, its setting in words, {split: outputs})."""
    from finetune import models

    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    model = models.build_model(cfg.model, task.num_outputs, models.image_size_for(cfg.data)).eval()
    name, head = _head(model)
    backbone = copy.deepcopy(model)
    backbone.set_submodule(name, nn.Identity())
    features = split_features(cfg, backbone, preprocessor, datasets, max_rows)
    train_x, train_y = features["train"]
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    scaled = {split: ((x - mean) / std, y) for split, (x, y) in features.items() if len(x)}
    val = scaled.get("val", (None, np.zeros(0)))
    weight, bias, setting = fit_linear(task, *scaled["train"], *val, metric)
    folded = weight / std  # (x - mean) / std @ W.T + b == x @ (W / std).T + (b - (W / std) @ mean)
    shifted = bias - folded @ mean
    head.weight.data = torch.as_tensor(folded, dtype=head.weight.dtype)
    head.bias.data = torch.as_tensor(shifted, dtype=head.bias.dtype)
    outputs = {split: linear_outputs(x, folded, shifted) for split, (x, _) in features.items() if len(x)}
    labels = {split: y for split, (x, y) in features.items() if len(x)}
    return model, preprocessor, DESCRIPTION.format(model=MODELS[task.type]), setting, outputs, labels
