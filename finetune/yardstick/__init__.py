"""The yardstick: the cheapest model that could work, fit on the run's own training split and
scored on its own val and test rows, so every result stands beside what it had to beat. Text:
TF-IDF + a linear model (yardstick/text.py); images: a linear probe on the pretrained model's
frozen features, cached between runs (yardstick/image.py). It runs on the driver before
training, bounded by `yardstick.max_rows` (larger splits are sampled with the seed, and the
summary says so), and is saved in RUN_DIR/yardstick/ as plain arrays and JSON, or as a saved
model (nothing is unpickled to load it), where `finetune predict --model yardstick` uses it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from finetune import files
from finetune.config import PipelineConfig, judged_metric
from finetune.tasks import build_task, task_from_json

FOLDER = "yardstick"  # RUN_DIR/yardstick/: yardstick.json (what it is, its scores), the model's files
BOOTSTRAP_SAMPLES = 200  # resamples of the test rows behind the noise figure


@dataclass
class YardstickResult:
    kind: str  # what it reads: "text" or "image"
    description: str  # what the yardstick is, in words
    metrics: dict[str, float]  # yardstick_val/<metric>, yardstick_test/<metric> (and their samples)
    noise: dict[str, float]  # test metric name -> twice the bootstrap standard error of the yardstick's test score
    train_rows: int  # rows it was fit on
    train_rows_total: int  # rows of the training split (more: it was fit on a sample)
    scored_rows: dict[str, int]  # val / test rows scored (fewer than the split's where sampled)
    sampled: list[str]  # splits that were sampled to yardstick.max_rows
    setting: str  # the strength kept, e.g. "C=2.0"
    seconds: float

    def summary(self) -> dict:
        """summary.json's keys: yardstick_val_<metric>, yardstick_test_<metric>, and `yardstick`."""
        scores = {key.replace("/", "_"): value for key, value in self.metrics.items() if not key.endswith("/samples")}
        return {**scores, "yardstick": {k: v for k, v in asdict(self).items() if k != "metrics"}}

    def line(self, metric: str) -> str:
        """One console line: what it scored on val and test."""
        parts = [f"{split} {metric} {self.metrics[key]:.4f}" for split in ("val", "test")
                 if (key := f"yardstick_{split}/{metric}") in self.metrics and self.scored_rows.get(split)]  # fmt: skip
        sample = f" (a sample of {self.train_rows:,} of {self.train_rows_total:,} rows)" if self.train_rows < self.train_rows_total else ""
        return (f"yardstick: {self.description}, {self.setting}, fit on the training split{sample} in "
                f"{self.seconds:.0f} s: {', '.join(parts) or 'no val or test rows to score'}")


def metric_name(cfg: PipelineConfig) -> str:
    """The metric the run is judged by (config.judged_metric)."""
    return judged_metric(cfg.task.type, cfg.checkpoint.metric)


def fit_and_save(cfg: PipelineConfig, label_names: list[str], run_dir: Path) -> YardstickResult | None:
    """The yardstick of this pipeline, fit, scored on val and test and saved in RUN_DIR/yardstick;
    a run that already has one (resumed) keeps it. None when the training split has no rows."""
    from finetune.data.local import local_datasets, read_rows
    from finetune.yardstick import image, linear, text

    saved = Path(run_dir) / FOLDER / "yardstick.json"
    if saved.is_file():
        return YardstickResult(**json.loads(saved.read_text())["result"])
    started = time.perf_counter()
    limit = cfg.yardstick.max_rows
    kind, datasets = local_datasets(cfg.data, cfg.train.seed, label_names, cfg.task.type,
                                    dict.fromkeys(("train", "val", "test"), limit))  # fmt: skip
    if datasets["train"][1] == 0:
        return None
    task = build_task(cfg.task, label_names).with_outputs_in_units()
    metric = metric_name(cfg)
    if kind == "text":
        rows = {split: read_rows(ds, kind, total) for split, (ds, total) in datasets.items()}
        model, setting = text.fit(task, rows["train"].inputs, rows["train"].labels, rows["val"].inputs,
                                  rows["val"].labels, metric)  # fmt: skip
        description, preprocessor = model.description, None
        outputs = {split: model(rows[split].inputs) for split in ("val", "test") if rows[split].inputs}
        labels = {split: r.labels for split, r in rows.items()}
    else:
        model, preprocessor, description, setting, outputs, labels = image.fit(cfg, task, datasets, metric, limit)
    metrics, noise = {}, {}
    for split, split_outputs in outputs.items():
        if split == "train":
            continue
        scores, per_row = linear.score(task, split_outputs, labels[split], f"yardstick_{split}")
        metrics.update(scores)
        if split == "test":
            noise = _noise(task, per_row)
    result = YardstickResult(
        kind, description, metrics, noise, len(labels["train"]), datasets["train"][1],
        {split: len(labels.get(split, ())) for split in ("val", "test")},
        [split for split, (_, total) in datasets.items() if total > limit], setting, time.perf_counter() - started,
    )  # fmt: skip
    saved.parent.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        model.save(saved.parent)
    else:
        from finetune import models

        models.save_model(model, saved.parent / "model", cfg.model, preprocessor, task, models.image_size_for(cfg.data))
    files.write_text(saved, json.dumps({"kind": kind, "labels": task.label_names, "task": task.to_json(),
                                        "result": asdict(result)}, indent=2))  # fmt: skip
    return result


def _noise(task, rows: dict) -> dict[str, float]:
    """Twice the bootstrap standard error of each test metric: a fine-tuned model closer to the
    yardstick than this is not shown to differ from it on these rows."""
    rows = {name: values.numpy() for name, values in rows.items()}
    count = len(rows["loss"])
    if count < 2:
        return {}
    rng = np.random.default_rng(0)
    draws = [task.scores({name: values[picked] for name, values in rows.items()})
             for picked in (rng.integers(0, count, count) for _ in range(BOOTSTRAP_SAMPLES))]  # fmt: skip
    return {name: 2 * statistics.stdev(draw[name] for draw in draws) for name in draws[0]}


@dataclass(frozen=True)
class RawTexts:
    """The text yardstick's input: the texts themselves (its features are its own)."""

    kind: str = "text"

    def encode(self, texts: list) -> dict[str, list[str]]:
        return {"texts": [str(t) for t in texts]}


def load(run_dir: str | Path):
    """A run's yardstick as a `SavedModel` (model, preprocessor, task), for `finetune predict --model yardstick`."""
    from finetune.models import SavedModel, load_model
    from finetune.yardstick.text import TextYardstick

    folder = Path(run_dir) / FOLDER
    if not (folder / "yardstick.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no yardstick ({FOLDER}/yardstick.json missing): `finetune train` "
                                "fits one when yardstick.enabled is true (the default)")  # fmt: skip
    saved = json.loads((folder / "yardstick.json").read_text())
    if saved["kind"] == "image":  # the pretrained model with the probe's head: an ordinary saved model
        return load_model(folder / "model")
    task = task_from_json(saved["task"], saved["labels"])
    return SavedModel(TextYardstick.load(folder, task), RawTexts(), task)
