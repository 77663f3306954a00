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
            "scaling.num_workers=1"]  # fmt: skip


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
    sweep_dir = tmp_path / "sweep"
    args = ["tune", str(PIPELINES / "imagefolder-resnet-sweep.yaml"), *small(photos, local_weights(tmp_path, "resnet34"))]
    assert main([*args, "--sweep-dir", str(sweep_dir)]) == 0
    with (sweep_dir / "results.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == len(trials) == 2  # the grid: two learning rates, once each
    assert summary["best"]["params"]["optim.lr"] in (3e-3, 1e-2)
    assert (sweep_dir / "best.yaml").is_file() and (sweep_dir / "best").is_dir()
