"""Task types: each loss against its formula, each metric against a hand computation, the
task's settings checked against the config, and predictions as `finetune predict` prints them."""

import base64
import io
import json
import math
import random
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from browser import check_report
from helpers import FILLER, NEGATIVE, POSITIVE, write_csv
from finetune.cli import main
from finetune.config import ConfigError, LossConfig, TaskConfig, parse
from finetune.tasks import build_task, task_from_json
from finetune.tasks.classification import Classification
from finetune.tasks.multi_label import MultiLabel
from finetune.tasks.regression import Regression

LABELS = ["a", "b", "c"]
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [0.0, 0.3, 1.0], [1.0, 1.0, -1.0]])
MULTI_HOT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def _bce_by_hand(logits, target, pos_weight=None):
    p = torch.sigmoid(logits)
    w = torch.ones(logits.shape[-1]) if pos_weight is None else pos_weight
    return (-(w * target * torch.log(p) + (1 - target) * torch.log(1 - p))).mean().item()


def test_classification_metrics_match_hand_computation():
    task = Classification(LABELS)
    rows = {"loss": torch.full((6,), 0.5), "target": torch.tensor([0, 0, 1, 1, 2, 2]),
            "prediction": torch.tensor([0, 1, 1, 1, 2, 0])}  # fmt: skip
    metrics = task.metrics(rows, "val")
    assert metrics["val/accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (2 + 3), 2 * 1 / (2 + 1)]  # per class: 2TP / (support + predicted)
    assert metrics["val/macro_f1"] == pytest.approx(sum(f1) / 3)
    assert metrics["val/loss"] == pytest.approx(0.5) and metrics["val/samples"] == 6


def test_multi_label_losses_equal_their_formulas():
    task = MultiLabel(LABELS, 0.5)
    plain = task.training_loss(parse_loss("multi_label"), None)
    assert plain(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT))
    # balanced positive weights: negative rows / positive rows of each label (2/2, 2/2, 2/2 here ... and 3/1)
    stats = {"rows": 4, "sums": [2.0, 2.0, 1.0], "squares": 0.0}
    balanced = task.training_loss(parse_loss("multi_label", class_weights="balanced"), stats)
    weights = torch.tensor([1.0, 1.0, 3.0])
    assert balanced(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT, weights))
    # label smoothing moves each target toward 1/2
    smoothed = task.training_loss(parse_loss("multi_label", label_smoothing=0.2), None)
    assert smoothed(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT * 0.8 + 0.1))
    # sigmoid focal: gamma 0 and no alpha is BCE; gamma 2, alpha 0.25 is the paper's formula
    focal0 = task.training_loss(parse_loss("multi_label", name="focal", gamma=0.0), None)
    assert focal0(LOGITS, MULTI_HOT).item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT), rel=1e-5)
    focal = task.training_loss(parse_loss("multi_label", name="focal", gamma=2.0, alpha=0.25), None)
    p = torch.sigmoid(LOGITS)
    p_t = p * MULTI_HOT + (1 - p) * (1 - MULTI_HOT)
    alpha_t = 0.25 * MULTI_HOT + 0.75 * (1 - MULTI_HOT)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean().item()
    assert focal(LOGITS, MULTI_HOT).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="no training row has label"):
        task.training_loss(parse_loss("multi_label", class_weights="balanced"), {"rows": 4, "sums": [2, 0, 1], "squares": 0})


def parse_loss(task: str, **loss) -> LossConfig:
    return parse({"data": {"source": "x.csv"}, "model": {"name": "x"}, "task": {"type": task}, "loss": loss}).loss


def test_multi_label_metrics_match_hand_computation():
    task = MultiLabel(LABELS, [0.5, 0.5, 0.7])
    probability = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.4, 0.6, 0.8], [0.7, 0.4, 0.1]])
    target = MULTI_HOT.to(torch.uint8)
    metrics = task.metrics({"loss": torch.full((4,), 0.25), "target": target, "probability": probability}, "val")
    # predicted at the thresholds: a: rows 0, 3; b: rows 1, 2; c (0.7): row 2 only
    # a: TP 2 FP 0 FN 0 -> F1 1; b: TP 1 (row 1) FP 1 (row 2) FN 1 (row 3) -> 0.5; c: TP 1 FP 0 FN 1 -> 2/3
    assert metrics["val/macro_f1"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert metrics["val/micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # TP 4, FP 1, FN 2
    # average precision per label (rank by score, precision at each positive):
    # a: positives ranked 1, 2 -> 1; b: scores .8(+) .6(-) .4(+) .2 -> (1 + 2/3) / 2; c: .8(+) .6(+) -> 1
    assert metrics["val/map"] == pytest.approx((1 + (1 + 2 / 3) / 2 + 1) / 3)
    assert metrics["val/loss"] == pytest.approx(0.25)
    rows = task.eval_rows(LOGITS, MULTI_HOT)
    assert rows["loss"].mean().item() == pytest.approx(_bce_by_hand(LOGITS, MULTI_HOT))
    prediction = task.predict(torch.tensor([[2.0, -2.0, 0.5]]))[0]  # sigmoid 0.88, 0.12, 0.62 (< 0.7)
    assert prediction["labels"] == ["a"] and prediction["probabilities"]["c"] == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


def test_regression_trains_on_the_standardised_target_and_reports_its_own_units():
    stats = {"rows": 4, "sums": [20.0], "squares": 4 * 25.0 + 4 * 4.0}  # mean 5, std 2
    task = build_task(TaskConfig(type="regression"), ["price"], stats)
    assert (task.mean, task.std, task.num_outputs) == (5.0, 2.0, 1)
    outputs = torch.tensor([[0.5], [-1.0], [0.0], [2.0]])  # standardised predictions: 6, 3, 5, 9
    target = torch.tensor([7.0, 3.0, 4.0, 9.0])
    mse = task.training_loss(parse_loss("regression"), stats)
    assert mse(outputs, target).item() == pytest.approx(((0.5 - 1.0) ** 2 + 0 + 0.5**2 + 0) / 4)
    huber = task.training_loss(parse_loss("regression", name="huber", delta=0.25), stats)
    # |error| 0.5 > delta: delta * (|e| - delta / 2) = 0.25 * 0.375 each; two such rows of four
    assert huber(outputs, target).item() == pytest.approx(2 * 0.25 * 0.375 / 4)
    metrics = task.metrics(task.eval_rows(outputs, target), "test")
    errors = [-1.0, 0.0, 1.0, 0.0]
    assert metrics["test/mae"] == pytest.approx(0.5)
    assert metrics["test/rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))
    assert metrics["test/loss"] == pytest.approx(0.5)
    total = sum((t - 5.75) ** 2 for t in target.tolist())
    assert metrics["test/r2"] == pytest.approx(1 - 2.0 / total)
    assert task.predict(torch.tensor([[1.5]])) == [{"value": pytest.approx(8.0)}]
    unscaled = build_task(TaskConfig(type="regression", normalize_targets=False), ["price"], stats)
    assert (unscaled.mean, unscaled.std) == (0.0, 1.0)


def test_tasks_round_trip_through_their_saved_form():
    for task in (Classification(LABELS), MultiLabel(LABELS, [0.3, 0.5, 0.9]), Regression(["y"], 2.5, 0.5)):
        again = task_from_json(task.to_json(), task.label_names)
        assert type(again) is type(task) and again.to_json() == task.to_json()
    assert isinstance(task_from_json({"type": "classification"}, LABELS), Classification)


def test_classification_loss_is_cross_entropy_on_the_class_index():
    loss = Classification(LABELS).training_loss(parse_loss("classification"), None)
    target = torch.tensor([0, 1, 2, 0])
    assert loss(LOGITS, target).item() == pytest.approx(F.cross_entropy(LOGITS, target).item())


@pytest.mark.parametrize(
    "section, message",
    [
        ({"task": {"type": "regression"}, "loss": {"name": "focal"}}, "loss.name=focal is not a regression loss"),
        ({"task": {"type": "multi_label"}, "checkpoint": {"metric": "val/accuracy"}},
         "checkpoint.metric=val/accuracy: a multi_label task reports val/micro_f1, val/macro_f1, val/map, val/loss"),
        ({"task": {"type": "regression"}, "train": {"early_stopping": {"metric": "val/map"}}},
         "train.early_stopping.metric=val/map"),
        ({"task": {"type": "regression"}, "data": {"source": "x.csv", "mixup_alpha": 0.2}}, "mixup_alpha"),
        ({"task": {"type": "classification", "threshold": [0.5, 0.5]}}, "per-label thresholds are for multi_label"),
        ({"task": {"type": "regression"}, "loss": {"class_weights": "balanced"}}, "a regression target has no classes"),
        ({"task": {"type": "multi_label"}, "loss": {"name": "focal", "alpha": [0.2, 0.3]}}, "one number in (0, 1)"),
        ({"task": {"type": "multi_label", "threshold": 1.0}}, "strictly between 0 and 1"),
        ({"task": {"type": "ranking"}}, "task.type"),
    ],
)  # fmt: skip
def test_settings_that_do_not_fit_the_task_are_config_errors(section, message):
    raw = {"data": {"source": "x.csv"}, "model": {"name": "x"}, **section}
    with pytest.raises(ConfigError) as error:
        parse(raw)
    assert message in str(error.value)


def test_task_defaults_fill_loss_metric_and_mode():
    def resolved(task):
        cfg = parse({"data": {"source": "x.csv"}, "model": {"name": "x"}, "task": {"type": task}})
        return cfg.loss.name, cfg.checkpoint.metric, cfg.checkpoint.mode

    assert resolved("classification") == ("cross_entropy", "val/accuracy", "max")
    assert resolved("multi_label") == ("bce", "val/micro_f1", "max")
    assert resolved("regression") == ("mse", "val/rmse", "min")


def test_a_wrong_number_of_thresholds_is_a_config_error():
    with pytest.raises(ConfigError, match=r"task.threshold has 2 values; the data has 3 labels \(a, b, c\)"):
        build_task(TaskConfig(type="multi_label", threshold=[0.5, 0.6]), LABELS)


# ---- end to end: a multi-label sweep of 2-worker DDP runs (text), a regression run (images)


def _topic_rows(count: int, seed: int = 0) -> list[dict]:
    """Texts with no, one or both kinds of sentiment word (each said twice: the tiny model learns
    two independent cues in ~40 steps); the topics column names the kinds present."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        topics = [["good"], ["bad"], ["good", "bad"], []][i % 4]
        words = rng.sample(FILLER, 2) + [rng.choice(POSITIVE if t == "good" else NEGATIVE) for t in topics for _ in "12"]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "topics": "|".join(topics)})
    return rows


@pytest.mark.e2e
def test_multi_label_sweep_over_losses_with_ddp_beats_a_constant_predictor(ray_session, tmp_path, tiny_bert_dir, capsys):
    rows = _topic_rows(640)
    data = write_csv(tmp_path / "topics.csv", rows)
    pipeline = tmp_path / "topics.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "topics",
        "task": {"type": "multi_label"},
        "data": {"source": str(data), "text_column": "review", "label_column": "topics", "max_length": 16,
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"name": f"hf:{tiny_bert_dir}"},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 4, "batch_size": 8, "precision": "fp32"},
        # 2 x 0.45 + the trial actor's 0.01 leave Ray Data a whole CPU of the 2 (0.5 would hang; warned)
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.45},
        "checkpoint": {"num_to_keep": 1},
        "tune": {"search_space": {"loss.name": {"grid": ["bce", "focal"]}}, "num_samples": 1,
                 "scheduler": {"name": "fifo"}},
    }))  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    assert main(["tune", str(pipeline), "--sweep-dir", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "ranked by val/micro_f1" in out and "warning" not in out
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["errored"] == 0 and summary["metric"] == "val/micro_f1"
    best = summary["best"]
    # A constant predictor: every label on (the best constant F1) or the same score for all rows (AP = prevalence).
    prevalence = sum(len(r["topics"].split("|")) if r["topics"] else 0 for r in rows) / (2 * len(rows))
    assert best["test/micro_f1"] > 2 * prevalence / (1 + prevalence) + 0.2
    assert best["test/map"] > prevalence + 0.4 and best["test/macro_f1"] > 0.85
    assert json.loads((sweep_dir / "best" / "task.json").read_text()) == {"type": "multi_label", "thresholds": [0.5, 0.5]}
    # each trial's run folder-less metrics name the task's metrics every epoch
    trials = sorted((sweep_dir / "sweep").glob("*/result.json"))
    assert len(trials) == 2
    for trial in trials:
        epochs = [r for r in map(json.loads, trial.read_text().splitlines()) if "epochs_done" in r]
        assert len(epochs) == 4 and all({"val/micro_f1", "val/macro_f1", "val/map", "val/loss"} <= set(e) for e in epochs)

    capsys.readouterr()
    # inputs shaped like the training texts (two filler words, each sentiment word twice)
    assert main(["predict", str(sweep_dir), "great the awful great film awful", "the film"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bad 0.") and ", good 0." in lines[0]  # both kinds of word: both labels
    assert lines[1].startswith("(no label)")


@pytest.mark.e2e
def test_regression_image_run_beats_the_mean_and_predicts_in_target_units(ray_session, tmp_path, capsys):
    """Grey squares whose target is their brightness on a 0-10 scale; Huber loss on the standardised target."""
    rows = []
    for i in range(240):
        shade = (i * 37) % 256
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (shade, shade, shade)).save(buffer, format="PNG")
        rows.append({"image": buffer.getvalue(), "brightness": shade / 25.5})
    data = tmp_path / "shades.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    pipeline = tmp_path / "shades.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "shades",
        "task": {"type": "regression"},
        "loss": {"name": "huber"},
        "data": {"source": str(data), "label_column": "brightness", "image_size": 16,
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"name": "torchvision:resnet18", "weights": "none"},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 4, "batch_size": 8, "precision": "fp32"},
        "checkpoint": {"num_to_keep": 1},
    }))  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    targets = [r["brightness"] for r in rows]
    spread = statistics.pstdev(targets)  # the RMSE of predicting the mean
    assert summary["task"] == "regression" and summary["best_val_metric"].keys() == {"val/rmse"}
    assert summary["test_rmse"] < 0.5 * spread and summary["test_r2"] > 0.75
    assert summary["test_mae"] <= summary["test_rmse"] and summary["baseline_test_r2"] < summary["test_r2"]
    task = json.loads((run_dir / "best" / "task.json").read_text())
    # trained on the standardised target, saved with the scaling folded into the head: the model's
    # own outputs are in the target's units (what transformers or an ONNX runtime reads), as predict shows below
    assert task == {"type": "regression", "mean": 0.0, "std": 1.0}
    # the report: predicted against true, and the largest errors with the pictures the model saw
    opened = check_report(run_dir / "report.html", {"learning curves", "predicted vs true"})
    assert "The largest errors on test" in opened.text
    mistakes = json.loads((run_dir / "test_results" / "mistakes.json").read_text())
    errors = [abs(float(m["predicted"]) - float(m["true"])) for m in mistakes]
    assert len(mistakes) == 12 and errors == sorted(errors, reverse=True)
    for mistake in mistakes:  # each thumbnail is the grey square whose brightness the row's target is
        picture = Image.open(io.BytesIO(base64.b64decode(mistake["image"].split(",", 1)[1])))
        assert picture.size == (16, 16) and abs(picture.getpixel((8, 8))[0] / 25.5 - float(mistake["true"])) < 0.05

    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["test/rmse"] == pytest.approx(summary["test_rmse"], rel=1e-4)
    image = tmp_path / "grey.png"
    Image.new("RGB", (12, 12), (204, 204, 204)).save(image)
    assert main(["predict", str(run_dir), str(image)]) == 0
    value = float(capsys.readouterr().out.split()[0])
    assert abs(value - 8.0) < 1.5  # 204 / 25.5, in the target's units


def test_task_settings_are_searchable_and_checked_per_value():
    from finetune.tuning.space import check_search_space

    raw = {"data": {"source": "x.csv"}, "model": {"name": "x"}, "task": {"type": "multi_label"},
           "tune": {"search_space": {"loss.name": {"choice": ["bce", "focal", "mse"]},
                                     "task.threshold": {"uniform": [0.3, 0.7]}, "loss.gamma": {"choice": [1.0, 2.0]}}}}  # fmt: skip
    problems = check_search_space(raw, parse(raw).tune)
    assert problems == ["tune.search_space.loss.name='mse': loss.name=mse is not a multi_label loss; use one of bce, focal"]


def test_evaluation_rows_gather_across_ranks_when_one_shard_is_empty(tmp_path):
    """Two gloo ranks: rank 1 sees no test rows (a small split), rank 0 some; both get every row."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_on_rank, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _gather_on_rank(rank: int, world: int, store: str) -> None:
    from finetune.training import steps

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    task = Classification(LABELS)
    batches = [{"input": LOGITS, "label": torch.tensor([0, 1, 2, 0])}] if rank == 0 else []
    rows = steps.evaluate_rows(torch.nn.Identity(), batches, task, device=torch.device("cpu"), precision="fp32")
    metrics = task.metrics(steps.all_gather_rows(rows), "test")
    assert metrics["test/samples"] == 4 and metrics["test/accuracy"] == 1.0
    torch.distributed.destroy_process_group()
