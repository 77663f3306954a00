import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from browser import check_report
from helpers import image_parquet, mlflow_history, tensorboard_scalars, two_worker_pipeline, wandb_history, write_csv
from finetune.cli import main
from finetune.config import OptimConfig, ScheduleConfig
from finetune.training import optim, steps
from finetune.training.phases import PHASES
from finetune.tasks.classification import Classification


def test_warmup_then_linear_decay():
    param = nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer([{"params": [param]}], OptimConfig(lr=1.0))
    scheduler = optim.build_scheduler(optimizer, ScheduleConfig(name="linear", warmup_ratio=0.2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_train_epoch_accumulates_and_learns():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, features):
            return self.fc(features)

    model = Linear()
    optimizer = optim.build_optimizer([{"params": model.parameters()}], OptimConfig(lr=0.1))
    scheduler = optim.build_scheduler(optimizer, ScheduleConfig(name="constant", warmup_ratio=0.0), 100)
    batches = [{"features": x[i : i + 16], "label": y[i : i + 16]} for i in range(0, 256, 16)]
    device = torch.device("cpu")
    losses = []
    for _ in range(3):
        stats = steps.train_epoch(
            model, batches, optimizer, scheduler, nn.CrossEntropyLoss(),
            device=device, precision="fp32", max_steps=7, grad_accum_steps=2, max_grad_norm=1.0,
        )  # fmt: skip
        losses.append(stats.loss)
        assert stats.steps == 7 and stats.samples == 7 * 2 * 16
    assert losses[2] < losses[0]
    task = Classification(["neg", "pos"])
    rows = steps.evaluate_rows(model, batches, task, device=device, precision="fp32")
    assert task.metrics(rows, "val")["val/accuracy"] > 0.9


def test_train_epoch_reports_every_n_steps_and_the_last():
    model = nn.Linear(4, 2)
    optimizer = optim.build_optimizer([{"params": model.parameters()}], OptimConfig(lr=0.1))
    scheduler = optim.build_scheduler(optimizer, ScheduleConfig(name="constant", warmup_ratio=0.0), 10)
    batches = [{"input": torch.randn(8, 4), "label": torch.randint(0, 2, (8,))} for _ in range(7)]
    reports = []
    stats = steps.train_epoch(
        model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), device=torch.device("cpu"),
        precision="fp32", max_steps=7, report_every=3, on_step=lambda step, loss, s: reports.append((step, loss)),
    )  # fmt: skip
    assert [step for step, _ in reports] == [3, 6, 7]
    assert isinstance(stats.loss_sum, float) and reports[-1][1] == pytest.approx(stats.loss)


def test_step_code_and_models_import_without_ray():
    """A GPU box that measures the step (bench/gpu.py) has torch and transformers, no Ray."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None\n"  # every `import ray...` now fails
        "from finetune.training import steps\nfrom finetune import models\n"
        "from finetune.strategies import build_strategy\nfrom finetune.data import TextPreprocessor\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.e2e
def test_two_worker_run_learns_and_its_checkpoint_reloads(ray_session, tmp_path, tiny_bert_dir, capsys):
    """The real path: CLI -> Ray Data -> TorchTrainer with 2 DDP workers -> run directory."""
    pipeline = two_worker_pipeline(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    trackers = ["tracking.mlflow={}", "tracking.wandb={mode: offline}"]  # TensorBoard is on by default
    assert main(["train", str(pipeline), *trackers, "yardstick.enabled=true", "--run-dir", str(run_dir)]) == 0

    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.9 > summary["baseline_test_accuracy"]
    assert summary["train_samples_per_s"] > 0 and summary["wall_s"] > 0
    phases = summary["phases_s"]  # every phase of the run timed, adding up to its wall time
    assert set(phases) == set(PHASES) and all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(summary["wall_s"], abs=0.1)
    assert min(phases["training"], phases["worker_group_start"], phases["model_setup"]) > 0
    assert phases["other"] < 0.2 * summary["wall_s"]  # the clocks see most of the run
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    out = capsys.readouterr().out
    assert "finetune summary" in out and str(run_dir) in out and "\ntime: " in out
    _check_trackers(run_dir, epochs, summary)
    # report.html, as a person opens it: the figures draw, the table says what summary.json says
    opened = check_report(run_dir / "report.html", {"learning curves", "confusion matrix", "reliability diagram"})
    accuracy_row = next(line for line in opened.text.splitlines() if line.startswith("accuracy\t"))
    assert accuracy_row.split("\t")[1:4] == [f"{summary[k]:.4g}" for k in ("test_accuracy", "baseline_test_accuracy",
                                                                          "constant_test_accuracy")]  # fmt: skip
    for mistake in json.loads((run_dir / "test_results" / "mistakes.json").read_text()):
        assert mistake["text"].strip() and mistake["true"] != mistake["predicted"] and mistake["text"] in opened.text

    # The exported best model predicts exactly as the worker's copy did: same test metrics.
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test/samples"] == summary["test_samples"]
    assert evaluated["test/accuracy"] == pytest.approx(summary["test_accuracy"])
    assert evaluated["test/loss"] == pytest.approx(summary["test_loss"], rel=1e-4)

    assert main(["predict", str(run_dir), "a great movie", "an awful boring film"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["pos", "neg"]

    # the yardstick, fit on the driver before the workers started, on the same rows (tests/test_yardstick.py)
    assert summary["yardstick"]["train_rows"] == summary["train_rows"] and summary["phases_s"]["yardstick"] > 0
    assert summary["yardstick"]["scored_rows"]["test"] == summary["test_samples"]
    assert summary["yardstick_test_accuracy"] > 0.9 and summary["token_lengths"]["cut_share"] == 0.0
    assert accuracy_row.split("\t")[4] == f"{summary['yardstick_test_accuracy']:.4g}"  # the report's column
    assert main(["predict", str(run_dir), "--model", "yardstick", "a great movie", "an awful boring film"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == ["pos", "neg"]


def _check_trackers(run_dir: Path, epochs: list[dict], summary: dict) -> None:
    """One tracker run for the two DDP workers, in each tracker, holding what metrics.jsonl and
    summary.json hold, each epoch at the optimizer step it ended."""
    from mlflow import MlflowClient

    state = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(yaml.safe_load((run_dir / "config.yaml").read_text())["name"])
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == state["mlflow_run_id"] and run.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"best", "summary.json"}
    assert "model.json" in {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "best")}
    histories = {
        "tensorboard": tensorboard_scalars(run_dir / "tensorboard"),
        "mlflow": mlflow_history(state["mlflow_tracking_uri"], run.info.run_id),
        "wandb": wandb_history(run_dir),
    }
    last_step = epochs[-1]["steps_done"]
    for tracker, history in histories.items():
        for name in ("train/loss", "val/loss", "val/accuracy", "val/macro_f1"):
            assert history[name] == pytest.approx({e["steps_done"]: e[name] for e in epochs}, rel=1e-6), (tracker, name)
        assert history["test/accuracy"] == pytest.approx({last_step: summary["test_accuracy"]}), tracker
        assert max(history["step/loss"]) == last_step and set(history["lr/head"]) == set(history["step/loss"]), tracker


@pytest.mark.e2e
def test_same_seed_same_run(ray_session, tmp_path, tiny_bert_dir):
    """Seeds fix the split, head init, shuffling (length grouping's included) and dropout: a
    one-worker rerun retraces the first."""
    pipeline = two_worker_pipeline(tmp_path, tiny_bert_dir)
    losses = []
    for name in ("first", "second"):
        overrides = ["train.epochs=2", "scaling.num_workers=1", "data.max_train_samples=192", "data.group_by_length=true",
                     "--run-dir", str(tmp_path / name)]  # fmt: skip
        assert main(["train", str(pipeline), *overrides]) == 0
        epochs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([value for e in epochs for value in (e["train/loss"], e["val/loss"])])
    assert losses[0] == losses[1]


@pytest.mark.e2e
def test_bad_label_in_test_file_is_a_data_error_not_a_traceback(ray_session, tmp_path, tiny_bert_dir, capsys):
    pipeline = two_worker_pipeline(tmp_path, tiny_bert_dir)
    test_file = write_csv(tmp_path / "test.csv", [{"review": "good film", "sentiment": "meh"}] * 4)
    code = main(["train", str(pipeline), f"data.test_source={test_file}", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 1
    assert "data error:" in out and "label 'meh' is not one of the training labels ['neg', 'pos']" in out
    assert "Traceback" not in out


@pytest.mark.e2e
def test_image_run_with_augmentation_mixup_and_skipped_rows(ray_session, tmp_path, capsys):
    """Parquet of PNG bytes (two unreadable) -> augment + mixup on train -> 2 DDP workers."""

    data = image_parquet(tmp_path / "colours.parquet", broken_rows=[5, 11])
    pipeline = tmp_path / "image.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "colours",
        "data": {"source": str(data), "image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2,
                 "augment": [{"name": "horizontal_flip"}, {"name": "random_erasing", "p": 0.5}],
                 "mixup_alpha": 0.4, "shuffle": "full", "on_bad_rows": "skip"},
        "model": {"name": "torchvision:resnet18", "weights": "none"},
        "optim": {"lr": 3e-3},
        # 4 epochs of 3 steps per worker: 2 left a from-scratch ResNet at the constant predictor in one CI run of 3
        "train": {"epochs": 4, "batch_size": 4, "precision": "fp32"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"num_to_keep": 1},
    }))  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(summary["skipped_rows"].values()) == 2  # each bad row once, however many epochs read it
    assert "skipped bad rows (data.on_bad_rows=skip)" in capsys.readouterr().out
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 4 and all(0.0 <= e["train/data_wait_fraction"] <= 1.0 for e in epochs)
    # every good row in one split, each bad one skipped once: 40 rows in all
    assert summary["train_rows"] + epochs[-1]["val/samples"] + summary["test_samples"] + 2 == 40
    assert summary["test_accuracy"] > summary["constant_test_accuracy"]  # red or blue: learnable in four epochs


def test_train_compile_trains_as_eager_does_and_saves_the_plain_model(monkeypatch):
    """train.compile: the model's forward runs compiled on the worker, its steps end in eager's
    weights, and what is saved or copied (state_dict keys, the EMA copy) is the plain model."""
    import torch._inductor.config

    from finetune.config import EmaConfig
    from finetune.training import controls
    from finetune.training.setup import build_training
    from helpers import TinyCNN, pipeline_config, run_epochs

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # compiled dropout draws eager's masks
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.rand(8, 3, 6, 6, generator=generator),
                "label": torch.randint(0, 3, (8,), generator=generator)} for _ in range(4)]  # fmt: skip
    weights = {}
    for compiled in (False, True):
        # SGD: Adam would turn the float noise in the gradient of a bias before BatchNorm (zero in exact
        # arithmetic) into steps of the full learning rate, differently in each run
        cfg = pipeline_config(model={"name": "m", "layer_groups": [r"^net\.stem\.", r"^net\.block\."]},
                              optim={"name": "sgd", "lr": 0.1}, train={"compile": compiled})  # fmt: skip
        torch.manual_seed(0)
        training = build_training(cfg, TinyCNN(), steps_per_epoch=len(batches))
        assert (training.module._compiled_call_impl is not None) == compiled
        torch.manual_seed(1)
        run_epochs(training, batches, epochs=2)
        weights[compiled] = training.module.state_dict()
    assert list(weights[True]) == list(weights[False])  # no `_orig_mod.` prefix: checkpoints load either way
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert controls.ema_model(training.module, EmaConfig()).module._compiled_call_impl is None
