"""Long texts: data.long_text=head_tail keeps a long text's start and end (Sun et al. 2019);
windows reads all of it, its windows' logits averaged per text; in training, evaluation, predict
and a saved model alike."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from helpers import FILLER, NEGATIVE, POSITIVE, pipeline_config, tiny_sentiment_pipeline, write_csv
from finetune import models
from finetune.data.preprocess import TextPreprocessor, load_tokenizer
from finetune.data.rows import FILE, ROW
from finetune.models import load_model, save_model
from finetune.tasks import build_task

WORDS = FILLER + POSITIVE + NEGATIVE  # each one token of the tiny BERT's vocabulary


def test_head_tail_keeps_the_start_and_the_end_of_a_long_text(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    short_text = "a great film"
    cut = TextPreprocessor(str(tiny_bert_dir), max_length=10, long_text="head_tail", head_share=0.25)
    out = cut({"text": np.array([long_text, short_text], dtype=object)})
    words = long_text.split()
    # [CLS], round(8 * 0.25) = 2 words from the start, the last 6, [SEP]
    assert tokenizer.decode(out["input_ids"][0], skip_special_tokens=True).split() == words[:2] + words[-6:]
    assert out["input_ids"][0][0] == tokenizer.cls_token_id and out["input_ids"][0][-1] == tokenizer.sep_token_id
    assert out["attention_mask"][0].all()
    plain = TextPreprocessor(str(tiny_bert_dir), max_length=10)({"text": np.array([long_text, short_text], dtype=object)})
    np.testing.assert_array_equal(out["input_ids"][1], plain["input_ids"][1])  # a short text is not touched
    np.testing.assert_array_equal(out["attention_mask"][1], plain["attention_mask"][1])
    assert tokenizer.decode(plain["input_ids"][0], skip_special_tokens=True).split() == words[:8]


def test_a_saved_model_cuts_long_texts_as_its_run_did(tiny_bert_dir, tmp_path):
    cfg = pipeline_config(data={"source": "x", "max_length": 10, "long_text": "head_tail", "head_share": 0.5},
                          model={"name": f"hf:{tiny_bert_dir}"})  # fmt: skip
    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    assert (preprocessor.long_text, preprocessor.head_share) == ("head_tail", 0.5)
    model = models.build_model(cfg.model, 2)
    save_model(model, tmp_path / "best", cfg.model, preprocessor, build_task(cfg.task, ["neg", "pos"]))
    saved = load_model(tmp_path / "best")
    assert (saved.preprocessor.long_text, saved.preprocessor.head_share, saved.preprocessor.max_length) == ("head_tail", 0.5, 10)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    torch.testing.assert_close(saved.preprocessor.encode([text])["input_ids"],
                               torch.from_numpy(preprocessor({"text": np.array([text], dtype=object)})["input_ids"]))


# ---- data.long_text=windows -----------------------------------------------------------------


def _decoded(tokenizer, ids) -> list[str]:
    return tokenizer.decode(ids, skip_special_tokens=True).split()


def test_windows_read_a_long_text_whole_each_with_its_label(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    words = long_text.split()
    windowed = TextPreprocessor(str(tiny_bert_dir), max_length=10, long_text="windows")
    out = windowed({"text": np.array([long_text, "a great film"], dtype=object), "label": np.array([1, 0]),
                    FILE: np.array(["r.csv", "r.csv"]), ROW: np.array([0, 1])})  # fmt: skip
    # 8 tokens of room between [CLS] and [SEP], half a window (4) apart, the last ending with the text
    starts = [0, 4, 8, 12, 16, 20, 22]
    assert [_decoded(tokenizer, ids) for ids in out["input_ids"][:7]] == [words[s : s + 8] for s in starts]
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id for ids in out["input_ids"][:7])
    assert out["label"].tolist() == [1] * 7 + [0] and out["window"].tolist() == [*range(7), 0]
    ids = out["text_id"].tolist()
    assert len(set(ids[:7])) == 1 and ids[7] != ids[0]
    plain = TextPreprocessor(str(tiny_bert_dir), max_length=10)({"text": np.array(["a great film"], dtype=object)})
    np.testing.assert_array_equal(out["input_ids"][7], plain["input_ids"][0])  # a short text is one window, as it was
    capped = TextPreprocessor(str(tiny_bert_dir), max_length=10, long_text="windows", window_stride=6, max_windows=3)
    out = capped.encode([long_text])
    # starts 0, 6, 12, 18, 22 capped to three spread over them: the start, the middle, the end
    assert [_decoded(tokenizer, ids) for ids in out["input_ids"]] == [words[s : s + 8] for s in (0, 12, 22)]


def test_a_windows_id_is_its_file_and_row_wherever_it_is_read():
    from finetune.data import windows

    batch = {"text": np.array(["x", "y", "x"], dtype=object), FILE: np.array(["a.csv", "a.csv", "b.csv"]),
             ROW: np.array([0, 1, 0])}  # fmt: skip
    ids = windows.text_ids(batch)
    assert len(set(ids.tolist())) == 3
    assert windows.text_ids({k: v[1:] for k, v in batch.items()}).tolist() == ids[1:].tolist()
    assert windows.window_starts(5, 8, 4, 8) == [0] and windows.windows_of(5, 8, 4) == 1
    assert windows.windows_of(30, 8, 4) == len(windows.window_starts(30, 8, 4, 100)) == 7


# texts 7 (pos), 9 (neg) and 5 (neg), as windows whose logits disagree until averaged
WINDOW_LOGITS = torch.tensor([[0.0, 3.0], [0.0, -1.0], [2.0, 0.0], [0.0, -1.0], [0.0, 4.0]])
WINDOW_TEXTS = torch.tensor([7, 7, 9, 5, 5])  # text 7: windows 0 and 1; text 9: one window; text 5: two
WINDOW_PLACES = torch.tensor([0, 1, 0, 1, 0])
WINDOW_LABELS = torch.tensor([1, 1, 0, 0, 0])


def _window_batches(rows: slice) -> list[dict[str, torch.Tensor]]:
    return [{"input": WINDOW_LOGITS[rows], "label": WINDOW_LABELS[rows], "text_id": WINDOW_TEXTS[rows],
             "window": WINDOW_PLACES[rows]}]  # fmt: skip


def test_windows_are_scored_per_text_their_logits_averaged():
    from finetune.tasks.classification import Classification
    from finetune.training import steps

    task = Classification(["neg", "pos"])
    worst = steps.WorstRows(task, 5)
    rows = steps.evaluate_rows(torch.nn.Identity(), _window_batches(slice(None)), task, device=torch.device("cpu"),
                               precision="fp32", worst=worst)  # fmt: skip
    metrics = task.metrics(rows, "test")
    # per window 2 of 5 right; per text: 7 -> [0, 1] pos (right), 9 -> [2, 0] neg (right), 5 -> [0, 1.5] pos (wrong)
    assert metrics["test/samples"] == 3 and metrics["test/accuracy"] == pytest.approx(2 / 3)
    # the one mistake is text 5, shown by its first window (the last row), not its second
    [(_, inputs, row)] = worst.gathered()
    assert torch.equal(inputs["input"], WINDOW_LOGITS[4]) and row["target"] == 0


def test_windows_of_a_text_read_by_two_ranks_are_pooled_after_the_gather(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_pool_on_rank, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _pool_on_rank(rank: int, world: int, store: str) -> None:
    from finetune.tasks.classification import Classification
    from finetune.training import steps

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    task = Classification(["neg", "pos"])
    # rank 0 reads text 7's first window and text 9; rank 1 text 7's second and both of text 5's
    batches = _window_batches(slice(0, 1)) + _window_batches(slice(2, 3)) if rank == 0 else _window_batches(slice(1, 2)) + _window_batches(slice(3, 5))
    rows = steps.evaluate_rows(torch.nn.Identity(), batches, task, device=torch.device("cpu"), precision="fp32",
                               gather=True)  # fmt: skip
    metrics = task.metrics(rows, "test")
    assert metrics["test/samples"] == 3 and metrics["test/accuracy"] == pytest.approx(2 / 3), metrics
    torch.distributed.destroy_process_group()


def test_predict_averages_each_inputs_windows_in_the_inputs_order(tiny_bert_dir, tmp_path):
    from finetune.inference import predict_with

    cfg = pipeline_config(data={"source": "x", "max_length": 10, "long_text": "windows", "max_windows": 4},
                          model={"name": f"hf:{tiny_bert_dir}"})  # fmt: skip
    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    save_model(models.build_model(cfg.model, 2), tmp_path / "best", cfg.model, preprocessor,
               build_task(cfg.task, ["neg", "pos"]))  # fmt: skip
    saved = load_model(tmp_path / "best")
    preprocessing = json.loads((tmp_path / "best" / "preprocessing.json").read_text())
    assert (preprocessing["long_text"], preprocessing["window_stride"], preprocessing["max_windows"]) == ("windows", 4, 4)
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    inputs = [long_text, "a great film", long_text]
    predictions = predict_with(saved, inputs)
    assert [p["input"] for p in predictions] == inputs  # one answer per input, duplicates too
    windows = saved.preprocessor.encode([long_text])
    assert windows["text_id"].tolist() == [0, 0, 0, 0]
    with torch.no_grad():
        expected = torch.softmax(saved.model(input_ids=windows["input_ids"], attention_mask=windows["attention_mask"]).mean(0), -1)
    assert predictions[0]["probabilities"]["pos"] == pytest.approx(float(expected[1]), abs=1e-5)
    assert predictions[2]["probabilities"] == predictions[0]["probabilities"]


def long_sentiment_rows(count: int, seed: int = 0) -> list[dict]:
    """Texts of 30 words whose one sentiment word sits among the last ten: past the first 14
    tokens, so a model that reads only a text's start (max_length 16) cannot tell them apart."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(30)]
        words[rng.randrange(20, 30)] = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


@pytest.mark.e2e
def test_a_two_worker_windows_run_reads_the_end_of_long_texts(ray_session, tmp_path, tiny_bert_dir, capsys):
    from finetune.cli import main
    from finetune.export import export_run

    rows = long_sentiment_rows(480)
    first_windows = TextPreprocessor(str(tiny_bert_dir), max_length=16)({"text": np.array([r["review"] for r in rows])})
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    assert not any(set(_decoded(tokenizer, ids)) & set(POSITIVE + NEGATIVE) for ids in first_windows["input_ids"])
    data = write_csv(tmp_path / "long.csv", rows)
    # at lr 3e-3 (the tiny pipeline's) the windows without the word drown the signal: the loss stays at ln 2
    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, data={"source": str(data), "long_text": "windows"},
                                       optim={"lr": 1e-3}, train={"epochs": 5}, scaling={"num_workers": 2},
                                       yardstick={"enabled": True})  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    # 32 tokens each: windows at 0, 7, 14 and 18 of 30 words, each with its label
    assert summary["train_windows"] == 4 * summary["train_rows"] and f"({summary['train_windows']} windows)" in out
    assert summary["token_lengths"]["windows_mean"] == 4 and summary["token_lengths"]["capped_share"] == 0
    # metrics count texts, whichever rank read each window: as many as the yardstick scored
    assert summary["test_samples"] == summary["yardstick"]["scored_rows"]["test"]
    assert summary["test_accuracy"] > 0.9 > summary["baseline_test_accuracy"]  # truncated, as above: 0.47
    assert "cut" not in " ".join(summary["warnings"])

    assert main(["evaluate", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test/samples"] == summary["test_samples"]
    assert evaluated["test/accuracy"] == pytest.approx(summary["test_accuracy"])
    ending = {"pos": "the movie was a story " * 5 + "really great", "neg": "the movie was a story " * 5 + "really awful"}
    assert main(["predict", str(run_dir), ending["pos"], ending["neg"]]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == ["pos", "neg"]
    exported = export_run(run_dir, "pt2")  # checked against the run's model window by window
    assert exported.max_abs_diff <= 1e-4 and "average the logits per text" in exported.manifest["long_text"]


def test_duplicate_snippets_of_the_builtin_dataset_stay_apart_as_windows(ray_session, tiny_bert_dir):
    """Rotten Tomatoes repeats a few snippets word for word: each is its own text to evaluate."""
    from finetune.config import DataConfig
    from finetune.data.datasets import build_datasets

    data = DataConfig(source="rotten_tomatoes", max_length=16, long_text="windows")
    windowed = build_datasets(data, TextPreprocessor(str(tiny_bert_dir), 16, long_text="windows"), seed=0)
    test = windowed.test.to_pandas()
    plain = build_datasets(data, TextPreprocessor(str(tiny_bert_dir), 16), seed=0).test.count()
    assert test["text_id"].nunique() == plain and len(test) > plain  # every snippet once, some in several windows
