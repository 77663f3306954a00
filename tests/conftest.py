"""Shared fixtures: one Ray session per test run, tiny real models, small data files (helpers.py
holds what tests share that is not a fixture)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import FILLER, NEGATIVE, POSITIVE, WARM_WORKERS, sentiment_rows, write_csv
from finetune.ray_env import LOCAL_TRAIN_POLL_S

# The test session's Ray, the two-node cluster and the jobs head are started by the tests, not
# by ensure_ray, so they get its Train poll from here; subprocesses (drivers, heads) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_TRAIN_POLL_S)


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory) -> Path:
    """The image yardstick's feature cache in the session's temp folder, not the user's ~/.cache
    (drivers started as subprocesses inherit it)."""
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("finetune-cache"))
    return Path(os.environ["FINETUNE_CACHE"])


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """The embedded local Ray, started once; 2 CPUs as on the CI machine."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    # The dashboard (on 127.0.0.1) serves the state API, which Ray Train's placement-group
    # cleaner needs to free the workers' CPUs when Tune stops a trial early.
    ray.init(num_cpus=2, log_to_driver=False, logging_level="WARNING", include_dashboard=True,
             _system_config=WARM_WORKERS)  # fmt: skip
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


@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "reviews.csv", sentiment_rows(400))
