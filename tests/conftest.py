"""Shared fixtures: one Ray session per test run, tiny real models, small data files."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

# Ray Train's controller polls its workers every 2 s and acts on what it sees at the next poll:
# a tiny run spent ~5 s just waiting to be seen finished. Subprocesses (drivers, heads) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILLER = ["the", "movie", "was", "plot", "acting", "a", "story", "film", "really", "quite"]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """The embedded local Ray, started once; 2 CPUs as on the CI machine."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    # The dashboard (on 127.0.0.1) serves the state API, which Ray Train's placement-group
    # cleaner needs to free the workers' CPUs when Tune stops a trial early.
    ray.init(num_cpus=2, log_to_driver=False, logging_level="WARNING", include_dashboard=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with its own word-level vocabulary, saved like a hub checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


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
    snapshot = run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json"
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


@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "reviews.csv", sentiment_rows(400))


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
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values} if section in raw else values
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    return pipeline
