"""Ray Data readers for the files users have (CSV, JSON lines, Parquet, folders of images),
each row numbered within its file (`__row`) so a bad row is named by file and row. The only
module that reaches into `ray.data._internal` (Ray's CSV and JSON datasources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data._internal.datasource.csv_datasource import CSVDatasource
from ray.data._internal.datasource.json_datasource import ArrowJSONDatasource
from ray.data.datasource import FileBasedDatasource

from finetune.data.catalog import CATALOG
from finetune.data.rows import FILE, ROW, DataError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp")


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


def read_table_files(source: str, fmt: str) -> ray.data.Dataset:
    reader = {"csv": _NumberedCSV, "jsonl": _NumberedJSON, "parquet": _NumberedParquet}[fmt]
    ds = ray.data.read_datasource(reader(source, include_paths=True))
    return ds.rename_columns({"path": FILE})


def read_image_folder(source: str) -> ray.data.Dataset:
    ds = ray.data.read_binary_files(source, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))

    def add_label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = [Path(p).parent.name for p in batch["path"]]
        return {"image": batch["bytes"], "label": np.array(labels, dtype=object),
                FILE: batch["path"], ROW: np.full(len(labels), -1)}  # fmt: skip

    return ds.map_batches(add_label, batch_format="numpy")
