"""The yardstick (TF-IDF + a linear model beside every text result), the verdict that compares a
run with it, and the token-length check against data.max_length."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import FILLER, NEGATIVE, POSITIVE, sentiment_rows, tiny_sentiment_pipeline, write_csv
from finetune.cli import main
from finetune.config import TaskConfig
from finetune.data import token_lengths
from finetune.data.local import local_splits
from finetune.report import verdict
from finetune.tasks import build_task
from finetune.yardstick import linear, text

TOPICS = {"sport": ["goal", "match", "team"], "money": ["bank", "price", "market"], "food": ["bread", "soup", "cook"]}


def _sentiment(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    rows = sentiment_rows(count, seed)
    return [r["review"] for r in rows], np.array([1 if r["sentiment"] == "pos" else 0 for r in rows])


def _topics(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Texts that mention some of three topics; a multi-hot label per topic mentioned."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(count):
        on = [rng.random() < 0.4 for _ in TOPICS]
        words = rng.sample(FILLER, 4) + [rng.choice(words) for words, chosen in zip(TOPICS.values(), on) if chosen]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(np.array(on, dtype=np.float32))
    return texts, np.stack(labels)


def _scored(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Texts whose target is 2 per positive word minus 1 per negative word."""
    rng = random.Random(seed)
    texts, targets = [], []
    for _ in range(count):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.sample(FILLER, 3) + rng.choices(POSITIVE, k=good) + rng.choices(NEGATIVE, k=bad)
        rng.shuffle(words)
        texts.append(" ".join(words))
        targets.append(2.0 * good - bad)
    return texts, np.array(targets, dtype=np.float32)


@pytest.mark.parametrize(
    ("task_type", "labels", "make", "metric", "good_enough"),
    [("classification", ["neg", "pos"], _sentiment, "accuracy", 0.95),
     ("multi_label", list(TOPICS), _topics, "micro_f1", 0.95),
     ("regression", ["score"], _scored, "r2", 0.9)],
)  # fmt: skip
def test_yardstick_learns_each_task_and_reloads_from_plain_arrays(tmp_path, task_type, labels, make, metric, good_enough):
    task = build_task(TaskConfig(type=task_type), labels).with_outputs_in_units()
    texts, targets = make(400, 0)
    val_texts, val_targets = make(100, 1)
    model, setting = text.fit(task, texts, targets, val_texts, val_targets, metric)
    assert setting.split("=")[0] == ("alpha" if task_type == "regression" else "C")
    outputs = model(val_texts)
    assert outputs.shape == (100, task.num_outputs) and outputs.dtype == torch.float32
    scores, _ = linear.score(task, outputs, val_targets, "val")
    assert scores[f"val/{metric}"] >= good_enough

    model.save(tmp_path)
    with np.load(tmp_path / "text.npz", allow_pickle=False) as arrays:  # nothing in it needs unpickling
        assert all(arrays[name].dtype != object for name in arrays.files)
    reloaded = text.TextYardstick.load(tmp_path, task)
    torch.testing.assert_close(reloaded(val_texts), outputs)


@pytest.mark.parametrize(("task_type", "labels"), [("classification", ["a", "b", "c"]), ("multi_label", ["x", "y"])])
def test_each_strength_started_from_the_last_reaches_that_strengths_own_fit(task_type, labels):
    """Warm starts along the strengths only save iterations: every strength's model is the one a
    fit from scratch at that strength finds."""
    task = build_task(TaskConfig(type=task_type), labels).with_outputs_in_units()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 6)).astype(np.float32)
    scores = features @ rng.normal(size=(6, len(labels))) + rng.normal(scale=1.5, size=(300, len(labels)))
    targets = scores.argmax(1) if task_type == "classification" else (scores > 0).astype(np.float32)
    warm, weights = {}, []
    for strength in linear.STRENGTHS:
        warm_weight, warm_bias = linear._fit_one(task, features, targets, strength, warm)
        cold_weight, cold_bias = linear._fit_one(task, features, targets, strength, {})
        np.testing.assert_allclose(warm_weight, cold_weight, atol=1e-2)  # lbfgs's own tolerance
        np.testing.assert_allclose(warm_bias, cold_bias, atol=1e-2)
        weights.append(warm_weight)
    assert len(warm) == (1 if task_type == "classification" else len(labels))
    assert all(np.abs(a - b).max() > 0.05 for a, b in zip(weights, weights[1:]))  # the strengths do differ


def test_a_class_the_training_split_lacks_gets_the_logit_floor():
    task = build_task(TaskConfig(), ["neg", "pos", "unseen"])
    texts, targets = _sentiment(200, 0)
    model, _ = text.fit(task, texts, targets, [], np.zeros(0), "accuracy")
    probabilities = torch.softmax(model(["a great film", "a dull film"]), dim=-1)
    assert probabilities[:, 2].max() < 1e-5
    assert probabilities[:, :2].argmax(dim=-1).tolist() == [1, 0]


def _summary(score: float, stick: float, noise: float, **extra) -> dict:
    return {"task": "classification", "test_accuracy": score, "yardstick_test_accuracy": stick, "best_epoch": 1,
            "epochs_run": 3, "run_dir": "runs/r", "yardstick": {"description": "TF-IDF + logistic regression",
            "seconds": 4.0, "noise": {"accuracy": noise}}, **extra}  # fmt: skip


def test_verdict_says_when_the_yardstick_wins_ties_or_is_beaten():
    beaten = verdict.check(_summary(0.786, 0.851, 0.02), "val/accuracy")
    assert len(beaten) == 1
    assert "beats the fine-tuned model on test: accuracy 0.8510 against 0.7860" in beaten[0]
    assert "finetune predict runs/r --model yardstick" in beaten[0] and "strategy.name=auto" in beaten[0]
    assert "more train.epochs" not in beaten[0]  # its best epoch was not the last

    cut = {"cut_share": 0.6, "max_length": 128, "p90": 480}
    close = verdict.check(_summary(0.86, 0.851, 0.02, best_epoch=2, token_lengths=cut), "val/accuracy")
    assert "within the noise (+-0.0200" in close[0]
    assert "a longer data.max_length or data.long_text=head_tail or windows (60% of the training texts are cut at 128 tokens; p90 480)" in close[0]
    assert "more train.epochs (val was still improving" in close[0]

    assert verdict.check(_summary(0.90, 0.851, 0.02), "val/accuracy") == []
    perfect = verdict.check(_summary(1.0, 1.0, 0.0), "val/accuracy")
    assert "scores a perfect test accuracy too" in perfect[0] and "Try" not in perfect[0]
    lower_is_better = {"task": "regression", "test_rmse": 2.0, "yardstick_test_rmse": 1.5, "best_epoch": 0,
                       "epochs_run": 2, "yardstick": {"description": "ridge", "seconds": 1.0, "noise": {"rmse": 0.1}}}  # fmt: skip
    assert "beats the fine-tuned model on test: rmse 1.5000 against 2.0000" in verdict.check(lower_is_better, "val/rmse")[0]


def test_token_length_words_and_warning():
    stats = {"p50": 210, "p90": 640, "p99": 900, "longest": 1500, "max_length": 128, "cut_share": 0.73,
             "texts": 2000, "of": 11000, "model_limit": 512}  # fmt: skip
    assert token_lengths.describe(stats) == (
        "token lengths (a sample of 2,000 of 11,000 training texts): p50 210, p90 640, p99 900, longest 1500; "
        "data.max_length=128 cuts 73.0% of them")  # fmt: skip
    warning = token_lengths.warning(stats)
    assert warning.startswith("73% of the training texts are longer than data.max_length=128 tokens")
    assert "never reads their end. To read more, raise data.max_length (the model reads up to 512 tokens; p90 is " \
           "640), or set data.long_text=head_tail" in warning
    assert token_lengths.warning({**stats, "cut_share": 0.05}) is None
    assert token_lengths.warning({**stats, "max_length": 512}, "head_tail").endswith("never reads their middle.")
    windowed = {**stats, "windows_mean": 3.4, "max_windows": 8, "capped_share": 0.02}  # data.long_text=windows
    assert token_lengths.describe(windowed).endswith(
        "73.0% are longer than data.max_length=128 and read as windows: 3.40 windows per text, 2.0% of texts beyond "
        "data.max_windows=8")  # fmt: skip
    assert token_lengths.warning(windowed, "windows") is None  # read whole: nothing is cut
    capped = token_lengths.warning({**windowed, "capped_share": 0.3}, "windows")
    assert capped.startswith("30% of the training texts need more than data.max_windows=8 windows")


def test_local_splits_are_the_runs_rows_sampled_with_the_seed(ray_session, tmp_path):
    from finetune.config import DataConfig

    rows = sentiment_rows(300) + [{"review": "  ", "sentiment": "pos"}]  # no text: left out
    data = DataConfig(source=str(write_csv(tmp_path / "r.csv", rows)), text_column="review", label_column="sentiment")
    kind, splits = local_splits(data, 0, None, "classification", {"train": None, "val": None, "test": 10})
    assert kind == "text" and len(splits["test"].inputs) == 10 and splits["test"].sampled
    assert len(splits["train"].inputs) + len(splits["val"].inputs) + splits["test"].total == 300
    assert set(splits["train"].labels.tolist()) == {0, 1}
    again = local_splits(data, 0, None, "classification", {"test": 10})[1]
    assert again["test"].inputs == splits["test"].inputs


def test_validate_lengths_reads_the_texts_and_warns(ray_session, tmp_path, tiny_bert_dir, capsys):
    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, data={"max_length": 8})
    # a third of the reviews run on for 20 words: cut at 8 tokens
    long = [{**row, "review": row["review"] + " the film" * 10 * (i % 3 == 0)} for i, row in enumerate(sentiment_rows(300))]
    write_csv(tmp_path / "reviews.csv", long)
    assert main(["validate", str(pipeline), "--lengths"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "p99 28, longest 28; data.max_length=8 cuts 3" in out
    assert "warning: 3" in out and "of the training texts are longer than data.max_length=8 tokens and are cut" in out


def test_image_yardstick_probes_frozen_features_once_and_saves_a_model(ray_session, tmp_path, monkeypatch):
    """EfficientNet-Lite0's ImageNet features of a small greyscale folder, a probe on them, the
    features cached for the next run on the same images, the probe an ordinary saved model."""
    import runpy

    from finetune import yardstick
    from finetune.inference import predict_with
    from helpers import pipeline_config

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    runpy.run_path("pipelines/make_fashion_folder.py")["main"](
        [str(photos), "--train-images", "200", "--test-images", "60", "--classes", "3"])  # fmt: skip
    cfg = pipeline_config(data={"source": str(photos / "train"), "test_source": str(photos / "test"),
                                "val_fraction": 0.25, "image_size": 32}, model={"name": "efficientnet-lite0"})  # fmt: skip
    labels = sorted(p.name for p in (photos / "train").iterdir())
    result = yardstick.fit_and_save(cfg, labels, tmp_path / "run")
    assert result.kind == "image" and result.description.startswith("a linear probe on the pretrained model's frozen")
    pictures = len(list((photos / "train").rglob("*.png")))
    assert result.scored_rows["test"] == len(list((photos / "test").rglob("*.png")))
    assert result.train_rows == result.train_rows_total and result.train_rows + result.scored_rows["val"] == pictures
    assert result.metrics["yardstick_test/accuracy"] > 0.6  # 3 classes: a third by chance
    cached = sorted((tmp_path / "cache" / "features").iterdir())
    assert len(cached) == 3  # train, val, test
    again = yardstick.fit_and_save(cfg, labels, tmp_path / "run2")
    assert sorted((tmp_path / "cache" / "features").iterdir()) == cached  # read, not computed again
    assert again.metrics == result.metrics

    saved = yardstick.load(tmp_path / "run")
    image = next((photos / "test" / labels[0]).iterdir())
    [prediction] = predict_with(saved, [str(image)])
    assert prediction["label"] in labels and abs(sum(prediction["probabilities"].values()) - 1) < 1e-4
