"""Files users bring, as spreadsheets, editors and scripts write them: read as they are meant, or
stopped with one line naming the file, the row (or byte) and the fix. Each test writes its files."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import data_error_text, png_bytes, sentiment_rows, write_csv
from finetune.cli import main
from finetune.config import DataConfig
from finetune.data import ImagePreprocessor, TextPreprocessor
from finetune.data.datasets import build_datasets
from finetune.data.sources import load_source

MEAN_STD = ((0.0,) * 3, (1.0,) * 3)  # pixel values stay in [0, 1]: colours can be checked


def _cfg(path, **extra) -> DataConfig:
    return DataConfig(source=str(path), text_column="review", label_column="sentiment", val_fraction=0.0,
                      test_fraction=0.0, **extra)  # fmt: skip


def _train_rows(cfg: DataConfig, task: str = "classification") -> list[dict]:
    return load_source(cfg, seed=0, task=task).splits["train"].take_all()


def _reading_error(cfg: DataConfig, task: str = "classification") -> str:
    return data_error_text(lambda: _train_rows(cfg, task))


# ---- read as meant ------------------------------------------------------------------------------


def test_an_excel_csv_reads_as_written(ray_session, tmp_path):
    """RFC 4180 as Excel saves 'CSV UTF-8': a byte-order mark, quoted line breaks, doubled quotes,
    the delimiter inside quotes; extra columns in any order; a 2 MB cell; integer labels."""
    long_text = "word " * 400_000
    text = ("id,sentiment,review,notes\r\n"
            '1,1,"first line\r\nsecond, with a comma",x\r\n'
            '2,0,"she said ""no""",\r\n'
            f"3,1,{long_text.strip()},y\r\n")  # fmt: skip
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows = sorted(_train_rows(_cfg(path)), key=lambda r: r["__row"])
    assert [r["text"] for r in rows[:2]] == ["first line\r\nsecond, with a comma", 'she said "no"']
    assert len(rows[2]["text"]) == len(long_text.strip()) and [r["label"] for r in rows] == [1, 0, 1]
    assert set(rows[0]) == {"text", "label", "__file", "__row"}  # the extra columns are left behind


def test_tsv_semicolons_and_other_encodings(ray_session, tmp_path):
    rows = [{"review": "café au lait, très bon", "sentiment": "pos"}, {"review": "naïve; bad", "sentiment": "neg"}]
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("review\tsentiment\n" + "".join(f"{r['review']}\t{r['sentiment']}\n" for r in rows))
    assert {r["text"] for r in _train_rows(_cfg(tsv))} == {r["review"] for r in rows}

    semicolons = tmp_path / "semicolons.csv"  # Excel where the comma is the decimal mark
    semicolons.write_text('review;sentiment\n"café au lait, très bon";pos\n"naïve; bad";neg\n')
    message = _reading_error(_cfg(semicolons))
    assert message == (f"{semicolons}: column 'review', 'sentiment' not found; its columns are 'review;sentiment' "
                       "(set data.text_column / data.image_column / data.label_column); the header looks "
                       "';'-separated: set data.delimiter: ';'")  # fmt: skip
    assert {r["text"] for r in _train_rows(_cfg(semicolons, delimiter=";"))} == {r["review"] for r in rows}

    cp1252 = tmp_path / "old-excel.csv"
    cp1252.write_bytes("review,sentiment\ncafé crème,pos\nbad,neg\n".encode("cp1252"))
    assert _reading_error(_cfg(cp1252)) == (
        f"{cp1252}: byte 20 (0xe9) is not utf-8 text; set data.encoding to the file's encoding (files saved by "
        "older Excel are often cp1252)")  # fmt: skip
    assert {r["text"] for r in _train_rows(_cfg(cp1252, encoding="cp1252"))} == {"café crème", "bad"}

    utf16 = tmp_path / "unicode-text.txt.csv"  # Excel's "Unicode text": UTF-16 with its byte-order mark
    utf16.write_bytes("review\tsentiment\nthé vert\tpos\nbad\tneg\n".encode("utf-16"))
    assert "is UTF-16 text" in _reading_error(_cfg(utf16, delimiter="\t"))
    assert "set data.encoding: utf-16" in _reading_error(_cfg(utf16, delimiter="\t"))
    assert {r["text"] for r in _train_rows(_cfg(utf16, delimiter="\t", encoding="utf-16"))} == {"thé vert", "bad"}
    with pytest.raises(ValueError, match="unknown encoding 'utf-9'"):
        _cfg(utf16, encoding="utf-9")


def test_json_lines_and_a_json_array(ray_session, tmp_path):
    rows = sentiment_rows(6)
    lines = tmp_path / "reviews.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line
    array = tmp_path / "reviews.json"
    array.write_text(json.dumps(rows, indent=2))
    for path in (lines, array):
        assert sorted(r["text"] for r in _train_rows(_cfg(path))) == sorted(r["review"] for r in rows)


def _jpeg_turned_on_its_side() -> bytes:
    """A 20x10 (portrait once turned) JPEG whose EXIF orientation 6 says: rotate 90 degrees to show it."""
    picture = Image.new("RGB", (20, 10), (255, 0, 0))
    picture.paste((0, 0, 255), (0, 0, 10, 10))  # blue on the left as stored, on top once turned
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_image_tables_of_paths_structs_and_photos(ray_session, tmp_path):
    """A table of image paths (relative to the table's folder, or absolute), a Hugging Face-style
    struct column, and a phone photo whose EXIF orientation turns it upright."""
    folder = tmp_path / "shoot"
    (folder / "img").mkdir(parents=True)
    colours = {"red": (220, 10, 10), "blue": (10, 10, 220)}
    rows = []
    for i in range(8):
        label = "red" if i % 2 else "blue"
        (folder / "img" / f"{i}.png").write_bytes(png_bytes(colours[label]))
        path = f"img/{i}.png" if i < 4 else str(folder / "img" / f"{i}.png")  # relative, then absolute
        rows.append({"image": path, "label": label})
    table = write_csv(folder / "photos.csv", rows)
    cfg = DataConfig(source=str(table), val_fraction=0.25, test_fraction=0.25)
    datasets = build_datasets(cfg, ImagePreprocessor(8, *MEAN_STD), seed=0)
    got = [row for split in (datasets.train, datasets.val, datasets.test) for row in split.take_all()]
    assert len(got) == 8
    for row in got:  # blue is label 0: its blue channel is the bright one
        assert (row["pixel_values"][2].mean() > 0.5) == (row["label"] == 0)

    structs = pa.table({
        "image": [{"bytes": png_bytes(colours["red"]), "path": None}, {"bytes": None, "path": str(folder / "img" / "0.png")}],
        "label": ["red", "blue"],
    })  # fmt: skip
    pq.write_table(structs, tmp_path / "hf.parquet")
    hf = build_datasets(DataConfig(source=str(tmp_path / "hf.parquet"), val_fraction=0.0, test_fraction=0.0),
                        ImagePreprocessor(8, *MEAN_STD), seed=0).train.take_all()  # fmt: skip
    assert sorted((int(r["label"]), round(float(r["pixel_values"][0].mean()), 1)) for r in hf) == [(0, 0.0), (1, 0.9)]

    upright = ImagePreprocessor._decode(_jpeg_turned_on_its_side())
    assert upright.size == (10, 20)  # portrait, as the camera held it
    top, bottom = np.asarray(upright)[2, 5], np.asarray(upright)[17, 5]
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]


# ---- broken files: one line naming file, row and fix ---------------------------------------------


def _each_names_its_file(folder, cases: dict[str, tuple[str, str]]) -> None:
    """Each file name -> (its text, what its one-line error must say after the file's path)."""
    for name, (text, expected) in cases.items():
        path = folder / name
        path.write_text(text)
        message = _reading_error(_cfg(path))
        assert message.startswith(str(path)) and expected in message, (name, message)


def test_csv_files_that_are_not_what_they_seem(ray_session, tmp_path):
    cases = {
        "empty.csv": ("", "the file is empty (not even a header row)"),
        "header-only.csv": ("review,sentiment\n", "no rows (a header or an empty file and nothing else)"),
        "ragged.csv": ("review,sentiment\ngood one,pos\nbad, really bad,neg\n",
                       "row 1: 3 fields where the header has 2 ('bad, really bad,neg'); quote fields that hold the "
                       "delimiter ','"),
        "unclosed.csv": ('review,sentiment\ngood,pos\n"bad movie,neg\nok one,pos\nfine,neg\n',
                         "row 1: 1 fields where the header has 2 ('\"bad movie,neg\\nok one,pos\\nfine,neg'); a quote opens "
                         "a field here and does not close before the line ends"),
        "stray.csv": ('review,sentiment\ngood,pos\n"bad, one",neg\n"stray quote here,pos\nfine,neg\n"another, quoted",pos\n',
                      "row 2: 3 fields where the header has 2 ('\"stray quote here,pos\\nfine,neg\\n\"another, quoted\",pos'); a "
                      "quote opens a field here and does not close before the line ends, so the lines after it run "
                      "into this row: close or remove it"),
        "semicolons.csv": ("id;review;sentiment\n1;good, really;pos\n",
                           "the header has 1 field(s) split on ','; the header looks ';'-separated: set data.delimiter: ';'"),
        # a stray quote closed by a later one: the rows between would silently become one cell
        "merged.csv": ('review,sentiment\ngood,pos\n"bad movie,neg\nok one,pos\nthe "end" was fine",neg\nnice,pos\n',
                       "row 1: column 'review' holds line breaks and 1 more line(s) shaped like rows of this file"),
    }  # fmt: skip
    _each_names_its_file(tmp_path, cases)


def test_bad_json_lines_are_named_by_line(ray_session, tmp_path):
    good = json.dumps({"review": "good", "sentiment": "pos"})
    cases = {
        "truncated.jsonl": (f'{good}\n{{"review": "bad", "sentiment": \n{good}\n',
                            ", line 2: not valid JSON (Expecting value, column 32); a JSON lines file holds one "
                            "object per line"),
        "list.jsonl": (f'{good}\n["bad", "neg"]\n', ', line 2: a JSON list where an object ({"column": value, ...}) belongs'),
        "empty.jsonl": ("\n", ": no rows"),
    }  # fmt: skip
    _each_names_its_file(tmp_path, cases)
    not_parquet = tmp_path / "reviews.parquet"
    not_parquet.write_text("review,sentiment\ngood,pos\n")
    assert _reading_error(_cfg(not_parquet)).startswith(f"{not_parquet}: not a readable Parquet file (")


def test_labels_and_cells_a_model_cannot_learn_from(ray_session, tmp_path, tiny_bert_dir):
    one_class = write_csv(tmp_path / "all-positive.csv", [{"review": f"great {i}", "sentiment": "pos"} for i in range(20)])
    assert _reading_error(_cfg(one_class)) == (f"{one_class}: every row has the label 'pos': a classifier needs rows of "
                                               "at least two classes")  # fmt: skip

    rows = sentiment_rows(10)
    rows[3]["review"], rows[6]["review"] = "", "   "
    blanks = write_csv(tmp_path / "blank-cells.csv", rows)
    tokenizer = TextPreprocessor(str(tiny_bert_dir), max_length=16)
    datasets = build_datasets(_cfg(blanks), tokenizer, seed=0)
    assert data_error_text(datasets.train.take_all) == (
        f"{blanks}, row 3: empty text (set data.on_bad_rows=skip to drop such rows)")  # fmt: skip

    targets = tmp_path / "prices.csv"
    targets.write_text("review,sentiment\ncheap,1.5\nfree,\npriceless,inf\nfine,2.0\n")
    message = _reading_error(_cfg(targets), task="regression")
    assert message == f"{targets}, row 1: no target (an empty cell or NaN) (set data.on_bad_rows=skip to drop such rows)"
    skipping = build_datasets(_cfg(targets, on_bad_rows="skip"), tokenizer, seed=0, task="regression")
    assert sorted(float(r["label"]) for r in skipping.train.take_all()) == [1.5, 2.0]
    assert skipping.skipped_rows()["counts"] == {"train": 2}
    assert f"{targets}, row 2: target inf is not a finite number" in skipping.skipped_rows()["examples"]


def test_a_share_that_draws_no_rows_stops_before_training(ray_session, tmp_path):
    few = write_csv(tmp_path / "few.csv", sentiment_rows(6))
    cfg = DataConfig(source=str(few), text_column="review", label_column="sentiment", val_fraction=0.05)
    message = data_error_text(lambda: build_datasets(cfg, TextPreprocessor("unused"), seed=0))
    assert message.startswith(f"{few}: its ") and "drew no rows of" in message and "give data." in message


def test_data_errors_reach_the_user_as_one_line(ray_session, tmp_path, tiny_bert_dir, capsys):
    """Through `finetune train`: exit 1, one line, no traceback, and no run directory left that
    could neither be rerun nor resumed."""
    header_only = tmp_path / "reviews.csv"
    header_only.write_text("review,sentiment\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "data": {"source": str(header_only), "text_column": "review", "label_column": "sentiment", "max_length": 16},
        "model": {"name": f"hf:{tiny_bert_dir}"}, "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
    }))  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", str(pipeline), "--run-dir", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"data error: {header_only}: no rows" in out and "Traceback" not in out
    assert not (run_dir / "config.yaml").exists()  # no run to resume: fix the file, rerun the same command

    pipeline.write_text(json.dumps({
        "data": {"source": str(header_only), "text_column": "review", "label_column": "sentiment", "val_fraction": 0,
                 "max_length": 16},
        "model": {"name": f"hf:{tiny_bert_dir}"},
    }))  # fmt: skip
    capsys.readouterr()
    assert main(["validate", str(pipeline)]) == 2
    assert "data.val_fraction=0 and no data.val_source: there would be no val rows to choose the best checkpoint on" in (
        capsys.readouterr().out)  # fmt: skip
