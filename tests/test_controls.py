"""Training controls: early stopping, EMA of the weights, gradient clipping by value, and a
NaN/infinite loss that stops the run naming the step, keeping the last good checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import tiny_sentiment_pipeline
from finetune.cli import main
from finetune.config import EarlyStoppingConfig, EmaConfig, OptimConfig, ScheduleConfig
from finetune.training import TrainingDiverged, controls, optim, steps
from finetune.training.driver import checkpoint_folder


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stopper = controls.EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.01), "val/accuracy")
    accuracies = [0.5, 0.7, 0.705, 0.71, 0.72, 0.9]  # +0.005 is within min_delta, +0.01 is not more than it
    decisions = [stopper.should_stop({"val/accuracy": a}) for a in accuracies[:4]]
    assert decisions == [False, False, False, True]  # stops at the 4th epoch: 2 epochs without a > 0.01 gain
    loss_stopper = controls.EarlyStopping(EarlyStoppingConfig(patience=1), "val/loss")
    assert [loss_stopper.should_stop({"val/loss": v}) for v in (1.0, 0.8, 0.9)] == [False, False, True]
    resumed = controls.EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.01), "val/accuracy")
    resumed.load_state_dict({"best": 0.7, "epochs_without_improvement": 1})
    assert resumed.should_stop({"val/accuracy": 0.7})


def test_ema_weights_follow_the_formula():
    model = nn.Linear(2, 1)
    ema = controls.ema_model(model, EmaConfig(decay=0.9))
    expected = model.weight.detach().clone()
    ema.update_parameters(model)  # the first update copies the weights
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0 + step)
        ema.update_parameters(model)
        expected = 0.9 * expected + 0.1 * model.weight.detach()
        assert torch.allclose(ema.module.weight, expected)
    assert controls.ema_model(model, None) is None


def _one_step(max_grad_value: float | None, max_grad_norm: float | None) -> torch.Tensor:
    """The update a plain SGD(lr=1) step makes after clipping."""
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0], [-0.5]]))
    before = model.weight.detach().clone()
    optimizer = optim.build_optimizer([{"params": model.parameters()}], OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0))
    scheduler = optim.build_scheduler(optimizer, ScheduleConfig(name="constant", warmup_ratio=0.0), 1)

    class Regress(nn.Module):  # takes the batch's named inputs, as the project's models do
        def __init__(self) -> None:
            super().__init__()
            self.linear = model

        def forward(self, input):
            return self.linear(input)

    batch = [{"input": torch.ones(1, 1), "label": torch.zeros(1, 2)}]  # loss = sum(w^2)
    steps.train_epoch(Regress(), batch, optimizer, scheduler, lambda out, target: ((out - target) ** 2).sum(),
                      device=torch.device("cpu"), precision="fp32", max_steps=1,
                      max_grad_value=max_grad_value, max_grad_norm=max_grad_norm)  # fmt: skip
    return before - model.weight.detach()


def test_gradient_clipping_by_value_and_by_norm():
    assert _one_step(None, None).flatten().tolist() == pytest.approx([6.0, -1.0])  # grad = 2w
    assert _one_step(2.0, None).flatten().tolist() == pytest.approx([2.0, -1.0])  # each element to [-2, 2]
    by_norm = _one_step(None, 1.0).flatten()
    assert by_norm.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert (by_norm / by_norm.norm()).tolist() == pytest.approx([6 / 37**0.5, -1 / 37**0.5], rel=1e-4)


def test_a_non_finite_loss_raises_naming_the_first_bad_step():
    model = nn.Linear(2, 2)
    optimizer = optim.build_optimizer([{"params": model.parameters()}], OptimConfig(name="sgd", lr=0.1))
    scheduler = optim.build_scheduler(optimizer, ScheduleConfig(name="constant", warmup_ratio=0.0), 10)

    class Net(nn.Module):
        def forward(self, input):
            return model(input)

    batches = [{"input": torch.ones(4, 2) * (float("nan") if i == 5 else 1.0), "label": torch.zeros(4, dtype=torch.long)}
               for i in range(8)]  # fmt: skip
    with pytest.raises(TrainingDiverged, match="at optimizer step 6 of the epoch") as raised:
        steps.train_epoch(Net(), batches, optimizer, scheduler, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                          precision="fp32", max_steps=8, report_every=4)  # fmt: skip
    assert raised.value.step == 5  # found at the report after step 8, named as the step it happened at


def _pipeline(tmp_path: Path, tiny_bert_dir: Path, **sections) -> Path:
    return tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, name="controls", **{
        "scaling": {"max_failures": 2}, "checkpoint": {"num_to_keep": 3}, **sections})  # fmt: skip


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_a_diverging_run_stops_with_the_step_and_keeps_its_last_good_checkpoint(ray_session, tmp_path, tiny_bert_dir, capsys):
    # L2-SP with alpha * lr = 3 and plain SGD: each step multiplies the distance to the
    # pretrained weights by -2, so the loss overflows in the second epoch (found by a bare run).
    pipeline = _pipeline(tmp_path, tiny_bert_dir, optim={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0},
                         strategy={"name": "l2sp", "alpha": 3.0, "beta": 0.0}, schedule={"name": "constant", "warmup_ratio": 0.0},
                         train={"max_grad_norm": None, "epochs": 4})  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "training stopped: the training loss became NaN or infinite at optimizer step" in out
    assert "Traceback" not in out and "the last good checkpoint is kept at" in out
    logged = _epochs(run_dir)
    assert logged and len(logged) < 4 and all(e["train/loss"] == e["train/loss"] for e in logged)  # finite epochs only
    kept = sorted(p for p in checkpoint_folder(run_dir).glob("checkpoint_*") if p.is_dir())
    assert len(kept) == len(logged)  # no checkpoint of the diverged weights
    state = torch.load(kept[-1] / "train_state.pt", weights_only=False)
    assert state["epoch"] == logged[-1]["epoch"]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (run_dir / "summary.json").exists()


@pytest.mark.e2e
def test_knobs_together_early_stopping_ema_focal_balanced_cosine_restarts(ray_session, tmp_path, tiny_bert_dir, capsys):
    pipeline = _pipeline(
        tmp_path, tiny_bert_dir,
        optim={"name": "adamw", "no_decay": ["bias", "norm"], "weight_decay": 0.01},
        schedule={"name": "cosine_restarts", "num_cycles": 2, "warmup_ratio": 0.05},
        loss={"name": "focal", "gamma": 2.0, "class_weights": "balanced"},
        train={"epochs": 8, "max_grad_value": 5.0, "ema": {"decay": 0.9},
               "early_stopping": {"patience": 1, "metric": "val/accuracy"}},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 0
    logged = _epochs(run_dir)
    accuracies = [e["val/accuracy"] for e in logged]
    expected_stop = next(i for i in range(1, len(accuracies)) if accuracies[i] <= max(accuracies[:i]))  # patience 1
    assert len(logged) == expected_stop + 1 < 8 and logged[-1].get("early_stopped")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.9 and summary["early_stopped"] and summary["epochs_run"] == len(logged)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0  # the exported model is the EMA the workers tested
    assert json.loads(capsys.readouterr().out)["test/accuracy"] == pytest.approx(summary["test_accuracy"])
