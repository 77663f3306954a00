"""TrainState: what a checkpoint holds, saved and loaded into a freshly set-up run, continues
exactly as the run that wrote it would have (plain PyTorch, a tiny CNN with BatchNorm)."""

from __future__ import annotations

import pickle

import pytest
import torch
from finetune.config import EarlyStoppingConfig, EmaConfig
from finetune.training import controls
from finetune.training.setup import build_training
from finetune.training.state import TrainState
from helpers import TinyCNN, pipeline_config, run_epochs

EPOCHS = 3


def batches(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(8, 3, 6, 6, generator=generator) * 3 + 2,
             "label": torch.randint(0, 3, (8,), generator=generator)} for _ in range(4)]  # fmt: skip


def fresh_state(cfg) -> tuple[TrainState, object]:
    """A run as a worker sets it up: same seed, same pretrained weights, nothing trained yet."""
    torch.manual_seed(0)
    model = TinyCNN()
    training = build_training(cfg, model, steps_per_epoch=4)
    ema = controls.ema_model(training.module, cfg.train.ema)
    stopper = controls.EarlyStopping(cfg.train.early_stopping, "val/accuracy")
    state = TrainState(training.module, ema.module, training.optimizer, training.scheduler, training.strategy,
                       torch.amp.GradScaler("cpu"), ema, stopper)  # fmt: skip
    return state, training


def train_epoch(state: TrainState, training, epoch: int, val_accuracy: float) -> None:
    torch.manual_seed(100 + epoch)  # the dropout masks of this epoch, in the written and the resumed run alike
    run_epochs(training, batches(seed=epoch), first_epoch=epoch, after_step=lambda: state.ema.update_parameters(state.model))
    metrics = {"epoch": epoch, "val/accuracy": val_accuracy}
    state.best.update(epoch, val_accuracy, "max", state.evaluated)
    state.early_stopping.should_stop(metrics)
    state.epoch = epoch
    state.history.append(metrics)


def test_a_checkpoint_round_trip_continues_exactly(tmp_path):
    cfg = pipeline_config(
        strategy={"name": "gradual_unfreeze", "every_epochs": 1}, model={"name": "m", "layer_groups": [r"^net\.stem\.", r"^net\.block\."]},
        optim={"name": "adamw", "lr": 1e-2}, schedule={"name": "cosine", "warmup_ratio": 0.2},
        train={"epochs": EPOCHS, "ema": {"decay": 0.9}, "early_stopping": {"patience": 3}},
    )  # fmt: skip
    assert isinstance(cfg.train.ema, EmaConfig) and isinstance(cfg.train.early_stopping, EarlyStoppingConfig)
    written, training = fresh_state(cfg)
    written.baseline = {"baseline_test/accuracy": 0.31}
    train_epoch(written, training, 0, val_accuracy=0.6)  # the best epoch
    train_epoch(written, training, 1, val_accuracy=0.5)
    written.save(tmp_path)

    loaded, resumed = fresh_state(cfg)
    loaded.load(tmp_path)
    assert (loaded.epoch, loaded.next_epoch, loaded.baseline, loaded.history) == (1, 2, written.baseline, written.history)
    assert (loaded.best.epoch, loaded.best.metric) == (0, 0.6)
    for name, value in written.best.weights.items():  # the best epoch's weights, not this epoch's
        assert torch.equal(loaded.best.weights[name], value)
    assert loaded.early_stopping.state_dict() == written.early_stopping.state_dict() == {"best": 0.6, "epochs_without_improvement": 1}
    assert loaded.scheduler.state_dict() == written.scheduler.state_dict()
    assert loaded.scaler.state_dict() == written.scaler.state_dict()
    for a, b in zip(written.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)  # weights and BatchNorm buffers (running statistics, batches tracked)
    for a, b in zip(written.ema.state_dict().values(), loaded.ema.state_dict().values()):
        assert torch.equal(a, b)

    # one more epoch each: bit-identical weights, EMA, optimizer moments and learning rate
    train_epoch(written, training, 2, val_accuracy=0.7)
    train_epoch(loaded, resumed, 2, val_accuracy=0.7)
    for a, b in zip(written.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(written.ema.state_dict().values(), loaded.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.scheduler.get_last_lr() == training.scheduler.get_last_lr()
    moments = lambda state: [s["exp_avg"] for s in state.optimizer.state.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(written), moments(loaded)))
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == set(dict(loaded.model.named_parameters()))


def test_a_checkpoint_whose_own_epoch_was_best_saves_one_copy_of_the_weights(tmp_path):
    cfg = pipeline_config(train={"epochs": 2, "ema": {"decay": 0.9}, "early_stopping": {"patience": 2}})
    written, training = fresh_state(cfg)
    train_epoch(written, training, 0, val_accuracy=0.6)
    written.save(tmp_path)
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["best"]["state"] is None
    loaded, _ = fresh_state(cfg)
    loaded.load(tmp_path)
    for name, value in written.best.weights.items():  # rebuilt from the loaded evaluated weights (the EMA)
        assert torch.equal(loaded.best.weights[name], value)


def test_a_run_that_stopped_early_has_no_epochs_left(tmp_path):
    cfg = pipeline_config(train={"epochs": 5, "ema": {"decay": 0.9}, "early_stopping": {"patience": 1}})
    written, training = fresh_state(cfg)
    train_epoch(written, training, 0, val_accuracy=0.6)
    assert list(written.epochs_left(5)) == [1, 2, 3, 4]
    train_epoch(written, training, 1, val_accuracy=0.5)  # no better: patience 1 is spent
    written.save(tmp_path)
    loaded, _ = fresh_state(cfg)
    loaded.load(tmp_path)
    assert list(loaded.epochs_left(5)) == []


class _RunsCode:
    """What a crafted train_state.pt holds: unpickling it calls `touch MARKER`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_train_state_in_shared_storage_runs_no_code(tmp_path):
    cfg = pipeline_config(model={"name": "m"}, train={"epochs": EPOCHS, "ema": {"decay": 0.9}, "early_stopping": {"patience": 3}})
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "epoch": _RunsCode(str(marker))}, tmp_path / "train_state.pt")
    state, _ = fresh_state(cfg)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        state.load(tmp_path)
    assert not marker.exists()
