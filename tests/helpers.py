"""What tests share that is not a fixture: data files in the shapes users have, and small
pipelines. Imported by test modules (`from helpers import ...`); fixtures stay in conftest.py."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn
from PIL import Image

from finetune import config
from finetune.config import PipelineConfig
from finetune.data.rows import DataError, find_data_error
from finetune.models.vision import ImageClassifier
from finetune.training import steps

# Ray keeps idle worker processes (it keeps num_cpus of them, for 1 s): a test's Ray Train
# workers, split coordinators and Ray Data tasks then start in processes that have already
# imported torch and transformers, about a quarter off each run after the first. For the test
# session's Ray, the two-node cluster and the jobs head alike.
WARM_WORKERS = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000}

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILLER = ["the", "movie", "was", "plot", "acting", "a", "story", "film", "really", "quite"]


def sentiment_rows(count: int, seed: int = 0) -> list[dict]:
    """Short texts whose label is carried by one sentiment word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"review": " ".join(words) + f" {i % 7}", "sentiment": label})
    return rows


def registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train's controller has taken a reported checkpoint of `finetune train
    --run-dir RUN_DIR` as the latest, what a restart or --resume continues from (the
    checkpoint's folder appears before that)."""
    from finetune.training.driver import checkpoint_folder

    folder = checkpoint_folder(run_dir)
    if folder is None:
        return False
    snapshot = folder / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return False


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_sentiment_pipeline(tmp_path: Path, tiny_bert_dir: Path, *, rows: int = 400, name: str = "tiny",
                            **sections) -> Path:  # fmt: skip
    """A tiny-BERT pipeline over `rows` sentiment rows written to a CSV, one worker; each section
    given is merged over these defaults (a section not here, e.g. tune, is taken as it is)."""
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(rows))
    raw = {
        "name": name,
        "data": {"source": str(data), "text_column": "review", "label_column": "sentiment", "max_length": 16},
        "model": {"name": f"hf:{tiny_bert_dir}"},
        "optim": {"lr": 3e-3},
        # train_eval off: its sample and per-epoch pass cost seconds per run; tests of it turn it on
        "train": {"epochs": 3, "batch_size": 16, "precision": "fp32", "seed": 0, "train_eval_rows": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpoint": {"num_to_keep": 1},
        # the yardstick off for the same reason: tests/test_yardstick.py and the two-worker run turn it on
        "yardstick": {"enabled": False},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values} if section in raw else values
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    return pipeline


def two_worker_pipeline(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """The tiny sentiment pipeline on 640 rows, 2 DDP workers, progress every 2 steps."""
    return tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=640, train={"log_every_steps": 2},
                                   scaling={"num_workers": 2})  # fmt: skip


@contextlib.contextmanager
def process_group(process: subprocess.Popen):
    """`process` (started with start_new_session=True) and its whole group killed if it still runs
    when the block ends: a failed test leaves no driver or Ray of its own behind."""
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def ctrl_c(process: subprocess.Popen, timeout: float) -> str:
    """SIGINT to the process's group, as a terminal sends Ctrl-C; its output once it has exited."""
    os.killpg(process.pid, signal.SIGINT)
    return process.communicate(timeout=timeout)[0]


def png_bytes(color, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_parquet(path: Path, broken_rows=()) -> Path:
    """40 red or blue PNGs (bytes in an `image` column) with their `label`; `broken_rows` hold no image."""
    # a shade per row: distinct bytes, so the hash split spreads them (duplicates stay together)
    rows = [{"image": png_bytes((200, i, 0) if i % 2 else (0, i, 200)), "label": "red" if i % 2 else "blue"}
            for i in range(40)]  # fmt: skip
    for i in broken_rows:
        rows[i]["image"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pipeline_config(**sections) -> PipelineConfig:
    """A pipeline for plain-PyTorch tests of the training setup: placeholder data and model
    (nothing is read), the given sections over the defaults."""
    return config.parse({"data": {"source": "x"}, "model": {"name": "m"}, **sections})


def run_epochs(training, batches: list[dict], epochs: int = 1, grad_accum_steps: int = 1, first_epoch: int = 0,
               **options) -> list[set[str]]:  # fmt: skip
    """Real optimizer steps through `training.setup.Training` as the worker loop takes them, on the
    CPU in fp32 (the strategy's hooks, its penalty, BatchNorm train modes), from `first_epoch`
    (as a resumed run); returns the trainable parameter names before each optimizer step."""
    module, strategy = training.module, training.strategy
    per_epoch = len(batches) // grad_accum_steps
    trainable_by_step: list[set[str]] = []

    def before_step(epoch: int, step: int) -> None:
        strategy.before_step(epoch, epoch * per_epoch + step, module)
        trainable_by_step.append({n for n, p in module.named_parameters() if p.requires_grad})

    for epoch in range(first_epoch, first_epoch + epochs):
        steps.train_epoch(
            training.model, batches, training.optimizer, training.scheduler, torch.nn.CrossEntropyLoss(),
            device=torch.device("cpu"), precision="fp32", max_steps=per_epoch, grad_accum_steps=grad_accum_steps,
            penalty=lambda: strategy.penalty(module), before_step=lambda step, epoch=epoch: before_step(epoch, step),
            train_modes=training.train_modes.apply, **options,
        )  # fmt: skip
    return trainable_by_step


def data_error_text(run) -> str:
    """What the user reads when `run()` meets a bad row: the DataError itself (raised on the
    driver), or the one inside Ray Data's UserCodeException (raised in a read or preprocessing
    task), found as the CLI finds it."""
    from ray.exceptions import UserCodeException

    with pytest.raises((DataError, UserCodeException)) as raised:
        run()
    error = find_data_error(raised.value)
    assert error is not None, raised.value
    return str(error)


class TinyNet(nn.Module):
    """Two conv blocks with BatchNorm (input -> output: stem, block, head), for BatchNorm semantics."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def TinyCNN() -> ImageClassifier:
    """TinyNet behind the project's image-model wrapper (pixel_values in, logits out)."""
    return ImageClassifier(TinyNet())


# ---- reading back what the trackers logged, through each tracker's own format and reader


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in `logdir` (TensorBoard's own reader), tag -> step -> value."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    scalars: dict[str, dict[int, float]] = {}
    for run, tags in multiplexer.Runs().items():
        for tag in tags["scalars"]:
            for event in multiplexer.Scalars(run, tag):
                scalars.setdefault(tag, {})[event.step] = event.value
    return scalars


def wandb_offline_records(run_dir: Path) -> list:
    """The records of every offline W&B run file under `run_dir`, decoded with W&B's own protobuf
    schema. The file is a W&B header (7 bytes) then LevelDB-log records: 32 KiB blocks of
    [crc32c:4][length:2][type:1][data], a record longer than a block's rest split FIRST/MIDDLE/LAST."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data, position, pending = path.read_bytes(), 7, b""
        while position + 7 <= len(data):
            block_left = 32768 - (position % 32768)
            if block_left < 7:  # the block's tail is padding
                position += block_left
                continue
            length = int.from_bytes(data[position + 4 : position + 6], "little")
            kind = data[position + 6]
            if kind == 0 and length == 0:
                break
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # FULL, LAST
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(run_dir: Path) -> dict[str, dict[int, float]]:
    """What `run.log` logged in the run folder's offline W&B runs: key -> step -> value."""
    history: dict[str, dict[int, float]] = {}
    for record in wandb_offline_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = record.history.step.num
        for key, value in items.items():
            if not key.startswith("_"):
                history.setdefault(key, {})[step] = value
    return history


def mlflow_history(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of an MLflow run (MlflowClient), name -> step -> value; a step logged twice fails."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    history: dict[str, dict[int, float]] = {}
    for name in client.get_run(run_id).data.metrics:
        points = client.get_metric_history(run_id, name)
        steps_logged = [point.step for point in points]
        assert len(steps_logged) == len(set(steps_logged)), f"{name} logged twice at a step: {steps_logged}"
        history[name] = {point.step: point.value for point in points}
    return history
