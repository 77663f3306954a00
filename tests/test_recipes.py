"""The classic CNN recipes in pipelines/ run as written, on tiny generated image folders and
locally saved torchvision weights (no hub): only the data, the weights file and the sizes change."""

from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path

import pytest
import torch
import torchvision

from finetune.cli import main
from helpers import mlflow_history, tensorboard_scalars, wandb_history, wandb_offline_records

PIPELINES = Path(__file__).parent.parent / "pipelines"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make = runpy.run_path(str(PIPELINES / "make_fashion_folder.py"))["main"]
    make([str(root), "--train-images", "60", "--test-images", "30", "--classes", "3"])
    return root


def local_weights(tmp_path: Path, arch: str) -> Path:
    """A state dict saved as a user keeps downloaded weights (random here: no hub)."""
    path = tmp_path / f"{arch}.pth"
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path


def small(photos: Path, weights: Path) -> list[str]:
    return [f"data.source={photos / 'train'}", f"data.test_source={photos / 'test'}", "data.image_size=32",
            f"model.weights={weights}", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=32",
            "scaling.num_workers=1", "yardstick.enabled=false"]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize("recipe, arch", [
    ("cifar10-resnet18", "resnet18"), ("frozen-resnet50-linear", "resnet50"), ("resnet50-l2sp", "resnet50"),
])  # fmt: skip
def test_recipe_trains(ray_session, tmp_path, photos, recipe, arch):
    run_dir = tmp_path / "run"
    args = ["train", str(PIPELINES / f"{recipe}.yaml"), *small(photos, local_weights(tmp_path, arch))]
    assert main([*args, "--run-dir", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_samples"] == 30 and isinstance(summary["warnings"], list)
    frozen = "frozen with their groups" in summary["batchnorm"]["plan"]
    assert frozen == (recipe == "frozen-resnet50-linear")


@pytest.mark.e2e
def test_imagefolder_grid_search_keeps_the_best_on_val(ray_session, tmp_path, photos):
    """The two trials at once, each tracked as an MLflow run nested in the sweep's and a W&B run
    in the sweep's group."""
    sweep_dir = tmp_path / "sweep"
    args = ["tune", str(PIPELINES / "imagefolder-resnet-sweep.yaml"), *small(photos, local_weights(tmp_path, "resnet34")),
            # two trials of 0.45 + 0.01 CPU leave Ray Data one whole CPU of the 2
            "tune.max_concurrent_trials=2", "scaling.cpus_per_worker=0.45",
            "tracking.mlflow={}", "tracking.wandb={mode: offline}"]  # fmt: skip
    assert main([*args, "--sweep-dir", str(sweep_dir)]) == 0
    with (sweep_dir / "results.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == len(trials) == 2  # the grid: two learning rates, once each
    assert summary["best"]["params"]["optim.lr"] in (3e-3, 1e-2)
    assert (sweep_dir / "best.yaml").is_file() and (sweep_dir / "best").is_dir()

    from mlflow import MlflowClient

    parent_id = json.loads((sweep_dir / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("imagefolder-resnet").experiment_id])
    (parent,) = [r for r in runs if r.info.run_id == parent_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 3 and len(children) == 2 and parent.info.status == "FINISHED"
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == [3e-3, 1e-2]
    assert max(c.info.start_time for c in children) < min(c.info.end_time for c in children)  # they ran at once
    for child in children:
        trial_dir = sweep_dir / "trials" / child.info.run_name
        epochs = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
        assert child.info.status == "FINISHED" and len(epochs) == 1
        history = mlflow_history(client.tracking_uri, child.info.run_id)
        assert history["val/accuracy"] == pytest.approx({e["steps_done"]: e["val/accuracy"] for e in epochs})
        assert wandb_history(trial_dir)["val/accuracy"] == pytest.approx(history["val/accuracy"])
        assert tensorboard_scalars(trial_dir / "tensorboard")["val/accuracy"] == pytest.approx(history["val/accuracy"])
    assert parent.data.metrics["test/accuracy"] == pytest.approx(summary["best"]["test/accuracy"])
    assert {f.path for f in client.list_artifacts(parent_id)} == {"best", "summary.json"}
    groups = {record.run.run_group for t in (sweep_dir / "trials").iterdir() for record in wandb_offline_records(t)
              if record.WhichOneof("record_type") == "run"}  # fmt: skip
    assert groups == {"sweep"}
