"""Where rows come from: the builtin catalog (catalog.py) and user files (readers.py), as Ray
Datasets split into train/val/test (splits.py), labels encoded for the task (labels.py).

Every source yields the same columns, `text` or `image` plus `label`, so preprocessing and
training never care where data came from. `label` is encoded by task: an index into the
ordered `label_names` (classification), a 0/1 float vector over them (multi_label), or the
float target (regression, whose one "label name" is the target column).
"""

from __future__ import annotations

from pathlib import Path

import ray.data

from finetune.config import DataConfig
from finetune.data.catalog import CATALOG
from finetune.data.labels import check_known_labels, discover_labels, encode_labels
from finetune.data.readers import TableDialect, delimiter_hint, infer_format, read_image_folder, read_table_files
from finetune.data.rows import FILE, PROVENANCE, DataError, RowPolicy
from finetune.data.splits import SPLITS, Source, hash_split
from finetune.tasks import task_class


def _read_file_source(source: str, fmt: str, cfg: DataConfig, task: str) -> tuple[ray.data.Dataset, str, str]:
    """Raw rows of one file source, its input column renamed to text/image, and the column
    whose value decides a row's split (image files by path, everything else by content)."""
    fmt = infer_format(source) if fmt == "auto" else fmt
    if fmt == "image_folder":
        if not task_class(task).labels_from_class_folders:
            raise DataError(f"{source}: an image folder's labels are its class folders; a {task} task needs a "
                            "table (CSV, JSONL, Parquet) with an image column and a label column")  # fmt: skip
        return read_image_folder(source), "image", FILE
    ds = read_table_files(source, fmt, TableDialect(cfg.delimiter, cfg.encoding, cfg.label_column))
    schema = ds.schema()
    columns = [c for c in schema.names if c not in PROVENANCE]
    kind = "image" if cfg.image_column in columns and cfg.text_column not in columns else "text"
    input_column = cfg.text_column if kind == "text" else cfg.image_column
    missing = [c for c in (input_column, cfg.label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{source}: column {', '.join(repr(c) for c in missing)} not found; its columns are "
            f"{', '.join(map(repr, columns))} (set data.text_column / data.image_column / data.label_column)"
            + (delimiter_hint(columns[0], cfg.delimiter or ",") if fmt == "csv" and len(columns) == 1 else "")
        )
    label_type = schema.types[schema.names.index(cfg.label_column)]
    if problem := task_class(task).label_type_problem(label_type):
        raise DataError(f"{source}: label column {cfg.label_column!r} holds {label_type} values; {problem}")
    renames = {input_column: kind, cfg.label_column: "label"}
    ds = ds.select_columns([input_column, cfg.label_column, *PROVENANCE]).rename_columns(renames)
    return ds, kind, kind


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
    fixed = task_class(task).fixed_label_names(cfg.label_column)
    label_names = fixed or label_names or discover_labels(raw["train"], cfg.source, task, cfg.label_delimiter)
    if not fixed:
        for split, path in explicit.items():
            if path:
                check_known_labels(raw[split], label_names, path, task, cfg.label_delimiter)
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
                ds = hash_split(ds, key_column, split, val_fraction, test_fraction, seed)
            elif split != "train":
                ds = ds.limit(0)  # everything trains; this split has neither a file nor a share
        splits[split] = encode_labels(ds, label_names, origin, policies[split], task, cfg.label_delimiter)
    return Source(kind, label_names, splits)


def load_source(
    cfg: DataConfig, seed: int, policies: dict[str, RowPolicy] | None = None, label_names: list[str] | None = None,
    task: str = "classification",
) -> Source:  # fmt: skip
    """The configured rows, split into train/val/test, labels encoded for `task`, sizes capped.
    File sources (and rotten_tomatoes) keep the provenance columns (`__file`, `__row`) for
    preprocessing's messages and to tell windows' texts apart.
    `label_names`: a trained model's labels, reused instead of discovered (evaluate)."""
    loader = CATALOG.get(cfg.source)
    if loader and not task_class(task).labels_from_class_folders:
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
