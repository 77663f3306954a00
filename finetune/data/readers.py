"""Ray Data readers for the files users have (CSV, JSON lines, Parquet, folders of images),
each row numbered within its file (`__row`) so a bad row is named by file and row. The only
module that reaches into `ray.data._internal` (Ray's CSV and JSON datasources)."""

from __future__ import annotations

import codecs
import csv as pycsv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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


@dataclass(frozen=True)
class TableDialect:
    """How a user's table files are written: `data.delimiter` (None: tab for .tsv/.tab, else a
    comma), `data.encoding`, and the label column (rows merged by a stray quote are told apart
    by the labels on their lines)."""

    delimiter: str | None = None
    encoding: str = "utf-8"
    label_column: str | None = None

    def delimiter_for(self, path: str) -> str:
        if self.delimiter:
            return self.delimiter
        return "\t" if path.lower().endswith((".tsv", ".tab")) else ","

    @property
    def is_utf8(self) -> bool:
        return codecs.lookup(self.encoding).name == "utf-8"


UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _first_problem_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


def utf16_problem(path: str, head: bytes, dialect: TableDialect) -> DataError | None:
    """A UTF-16 file (its first bytes a UTF-16 byte-order mark) read as UTF-8."""
    if dialect.is_utf8 and head.startswith(UTF16_BOMS):
        return DataError(f"{path}: the file is UTF-16 text (it starts with a UTF-16 byte-order mark, as Excel's "
                         "'Unicode text' export writes); set data.encoding: utf-16")  # fmt: skip
    return None


def encoding_problem(path: str, raw: bytes, dialect: TableDialect) -> DataError | None:
    """Where `raw` (a file's bytes) stops being `dialect.encoding` text, as a DataError naming the byte."""
    if problem := utf16_problem(path, raw, dialect):
        return problem
    try:
        raw.decode(dialect.encoding)
    except UnicodeDecodeError as error:
        return DataError(f"{path}: byte {error.start} (0x{raw[error.start]:02x}) is not {dialect.encoding} text; set "
                         "data.encoding to the file's encoding (files saved by older Excel are often cp1252)")  # fmt: skip
    return None


def delimiter_hint(header: str, delimiter: str) -> str:
    """'; the header looks ';'-separated: ...' when a header holds another common delimiter and not
    the one in use (a spreadsheet saved where the comma is the decimal mark), else ''."""
    if delimiter in header:
        return ""
    found = next((d for d in (";", "\t", "|", ",") if d != delimiter and d in header), None)
    return f"; the header looks {found!r}-separated: set data.delimiter: {found!r}" if found else ""


class _NumberedRows:
    """Ray's file readers, plus each row's number within its file (the `__row` column), so a
    bad row can be named by file and row; a file without rows is an error naming it."""

    def _read_stream(self, f, path: str):
        start = 0
        try:
            for table in super()._read_stream(f, path):
                yield table.append_column(ROW, pa.array(np.arange(start, start + table.num_rows)))
                start += table.num_rows
        except OSError as error:  # storage refused or lost the file (permissions, a network error)
            raise DataError(f"{path}: cannot be read ({_first_problem_line(str(error))})") from None
        if start == 0:
            raise DataError(f"{path}: no rows (a header or an empty file and nothing else); every file of a source "
                            "needs at least one row")  # fmt: skip


class _CheckedCSV(CSVDatasource):
    """Ray's CSV reader as RFC 4180 has it (quoted fields may hold line breaks), with the
    configured delimiter and encoding; what pyarrow says about a broken file becomes a
    DataError naming the file, the row and the fix."""

    def __init__(self, paths, dialect: TableDialect, **kwargs):
        read_options = pacsv.ReadOptions(use_threads=False, encoding="utf8" if dialect.is_utf8 else dialect.encoding)
        super().__init__(paths, arrow_csv_args={"read_options": read_options}, **kwargs)
        self.dialect = dialect

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self.dialect.is_utf8:  # a UTF-16 file would read as one garbled column
            with filesystem.open_input_stream(path) as probe:
                if problem := utf16_problem(path, probe.read(2), self.dialect):
                    raise problem
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str):
        delimiter = self.dialect.delimiter_for(path)
        self.parse_options = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
        first_row = 0
        try:
            for table in super()._read_stream(f, path):
                self._check_text(table, path, delimiter, first_row)
                first_row += table.num_rows
                yield table
        except DataError:
            raise
        except (ValueError, pa.ArrowException) as error:  # Ray wraps pyarrow's ArrowInvalid in a ValueError
            raise self._parse_problem(path, error.__cause__ or error) from None

    def _raw(self, path: str, size: int = -1) -> bytes:
        with self._filesystem.open_input_stream(path) as stream:
            return stream.read(size) if size >= 0 else stream.read()

    def _parse_problem(self, path: str, error: BaseException) -> DataError:
        message = str(error)
        if isinstance(error, UnicodeDecodeError) or "decode" in message.lower():
            return encoding_problem(path, self._raw(path), self.dialect) or DataError(f"{path}: {message}")
        if "Empty CSV file" in message:
            return DataError(f"{path}: the file is empty (not even a header row)")
        found = re.search(r"(?:Row #(\d+): )?Expected (\d+) columns, got (\d+): (.*)", message, re.S)
        if not found:
            return DataError(f"{path}: not a readable CSV file ({_first_problem_line(message)})")
        expected, got, text = int(found[2]), int(found[3]), found[4]
        # pyarrow counts records from 1, the header first (and knows the number when reading in order)
        where = f"{path}, row {int(found[1]) - 2}" if found[1] else path
        delimiter = self.dialect.delimiter_for(path)
        header = self._raw(path, 65536).decode(self.dialect.encoding, "replace").lstrip("\ufeff").splitlines()[:1]
        if header and (hint := delimiter_hint(header[0], delimiter)):
            return DataError(f"{path}: the header has {expected} field(s) split on {delimiter!r}{hint}")
        if text.startswith('"') or f'{delimiter}"' in text:
            return DataError(f"{where}: {got} fields where the header has {expected} ({text[:60]!r}); a quote opens a "
                             "field here and does not close before the line ends, so the lines after it run into this "
                             "row: close or remove it")  # fmt: skip
        return DataError(f"{where}: {got} fields where the header has {expected} ({text[:60]!r}); quote fields that "
                         f"hold the delimiter {delimiter!r}, or set data.delimiter")  # fmt: skip

    def _check_text(self, table: pa.Table, path: str, delimiter: str, first_row: int) -> None:
        if any(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in table.schema.types):
            # pyarrow keeps a column whose bytes are not UTF-8 as binary
            raise encoding_problem(path, self._raw(path), self.dialect) or DataError(f"{path}: a column holds bytes, not text")
        label = self.dialect.label_column
        if label not in table.column_names:
            return
        labels = None  # read only when a cell holds a line break: this runs on every batch of every epoch
        width, at = table.num_columns, table.column_names.index(label)
        for name in table.column_names:
            if not pa.types.is_string(table.schema.field(name).type):
                continue
            column = table.column(name)
            for row in pc.indices_nonzero(pc.fill_null(pc.match_substring(column, "\n"), False)).to_pylist():
                if labels is None:
                    labels = {str(v) for v in table.column(label).to_pylist() if v is not None}
                if merged := _rows_inside(column[row].as_py(), delimiter, width, at, labels):
                    raise DataError(
                        f"{path}, row {first_row + row}: column {name!r} holds line breaks and {merged} more line(s) shaped like "
                        "rows of this file: a quote opened in this row closes only further down, so those rows "
                        "would be lost; fix the quoting"
                    )


def _rows_inside(cell: str, delimiter: str, width: int, label_at: int, labels: set[str]) -> int:
    """How many lines after a cell's first one parse as a whole row of the file (as many fields,
    one of the file's labels in the label column): rows a stray quote swallowed."""
    lines = cell.split("\n")[1:]
    rows = [fields for fields in pycsv.reader(lines, delimiter=delimiter) if len(fields) == width]
    return sum(1 for fields in rows if fields[label_at].strip() in labels)


class _CheckedJSON(ArrowJSONDatasource):
    """Ray's JSON reader in the configured encoding: a JSON lines file, or one JSON array; a bad
    line is named by number."""

    def __init__(self, paths, dialect: TableDialect, **kwargs):
        super().__init__(paths, **kwargs)
        self.dialect = dialect

    def _read_stream(self, f, path: str):
        raw = f.read_buffer().to_pybytes()
        if problem := encoding_problem(path, raw, self.dialect):
            raise problem
        if not self.dialect.is_utf8:
            raw = raw.decode(self.dialect.encoding).encode("utf-8")
        raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            return  # no rows: said as for any file without them
        if raw.lstrip()[:1] == b"[":  # one JSON array of objects
            yield from self._read_with_python_json(pa.py_buffer(raw))
            return
        try:
            tables = list(self._read_with_pyarrow_read_json(raw))
        except pa.ArrowInvalid as error:
            raise _json_lines_problem(path, raw, error) from None
        yield from tables


def _json_lines_problem(path: str, raw: bytes, error: Exception) -> DataError:
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as bad:
            return DataError(f"{path}, line {number}: not valid JSON ({bad.msg}, column {bad.colno}); a JSON lines "
                             "file holds one object per line")  # fmt: skip
        if not isinstance(value, dict):
            return DataError(f"{path}, line {number}: a JSON {type(value).__name__} where an object "
                             '({"column": value, ...}) belongs')  # fmt: skip
    return DataError(f"{path}: not a readable JSON lines file ({_first_problem_line(str(error))})")


class _ParquetFiles(FileBasedDatasource):
    """Parquet read file by file (Ray's own Parquet reader splits files into fragments, which
    loses the row numbers)."""

    _FILE_EXTENSIONS = ["parquet", "pq"]

    def __init__(self, paths, dialect: TableDialect, **kwargs):
        super().__init__(paths, **kwargs)  # the dialect is for text files: Parquet carries its own types

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet's footer needs random access

    def _read_stream(self, f, path: str):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file ({_first_problem_line(str(error))})") from None
        # Small batches: rows of image bytes are large, and blocks must fit a capped object store.
        for batch in parquet.iter_batches(batch_size=256):
            yield pa.Table.from_batches([batch])


class _NumberedCSV(_NumberedRows, _CheckedCSV):
    pass


class _NumberedJSON(_NumberedRows, _CheckedJSON):
    pass


class _NumberedParquet(_NumberedRows, _ParquetFiles):
    pass


def read_table_files(source: str, fmt: str, dialect: TableDialect) -> ray.data.Dataset:
    reader = {"csv": _NumberedCSV, "jsonl": _NumberedJSON, "parquet": _NumberedParquet}[fmt]
    ds = ray.data.read_datasource(reader(source, dialect, include_paths=True))
    return ds.rename_columns({"path": FILE})


def read_image_folder(source: str) -> ray.data.Dataset:
    ds = ray.data.read_binary_files(source, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))

    def add_label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = [Path(p).parent.name for p in batch["path"]]
        return {"image": batch["bytes"], "label": np.array(labels, dtype=object),
                FILE: batch["path"], ROW: np.full(len(labels), -1)}  # fmt: skip

    return ds.map_batches(add_label, batch_format="numpy")
