"""Bad input rows: named by file and row, or skipped and counted; odd sources read right."""


import numpy as np
import pytest
from PIL import Image

from helpers import data_error_text, image_parquet, png_bytes, sentiment_rows, write_csv, write_jsonl
from finetune.config import DataConfig
from finetune.data import DataError, ImagePreprocessor, TextPreprocessor
from finetune.data.datasets import build_datasets
from finetune.data.sources import load_source

MEAN_STD = ((0.5,) * 3, (0.5,) * 3)


def test_parquet_with_image_bytes_is_an_image_source(ray_session, tmp_path):
    path = image_parquet(tmp_path / "images.parquet")
    cfg = DataConfig(source=str(path), val_fraction=0.0, test_fraction=0.0)
    datasets = build_datasets(cfg, ImagePreprocessor(8, *MEAN_STD), seed=0)
    assert datasets.label_names == ["blue", "red"]
    rows = datasets.train.take_all()
    assert len(rows) == 40 and rows[0]["pixel_values"].shape == (3, 8, 8)
    assert set(rows[0]) == {"pixel_values", "label"}  # provenance columns end at preprocessing
    for row in rows:  # red images are label 1
        assert (row["pixel_values"][0].mean() > row["pixel_values"][2].mean()) == (row["label"] == 1)


def test_unreadable_image_names_file_and_row(ray_session, tmp_path):
    path = image_parquet(tmp_path / "images.parquet", broken_rows=[13])
    cfg = DataConfig(source=str(path), val_fraction=0.0, test_fraction=0.0)
    datasets = build_datasets(cfg, ImagePreprocessor(8, *MEAN_STD), seed=0)
    message = data_error_text(datasets.train.take_all)
    assert message.startswith(f"{path}, row 13: unreadable image (UnidentifiedImageError")
    assert message.endswith("(set data.on_bad_rows=skip to drop such rows)")


def test_skip_drops_bad_rows_and_counts_each_once(ray_session, tmp_path):
    path = image_parquet(tmp_path / "images.parquet", broken_rows=[3, 13])
    cfg = DataConfig(source=str(path), val_fraction=0.0, test_fraction=0.0, on_bad_rows="skip")
    datasets = build_datasets(cfg, ImagePreprocessor(8, *MEAN_STD), seed=0)
    assert len(datasets.train.take_all()) == 38
    assert len(datasets.train.take_all()) == 38  # a second epoch
    skipped = datasets.skipped_rows()
    assert skipped["counts"] == {"train": 2}
    assert any(f"{path}, row 3: unreadable image" in example for example in skipped["examples"])


def test_image_folder_bad_file_is_named(ray_session, tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (9, 9), (i * 50, 0, 0)).save(root / name / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG truncated")
    cfg = DataConfig(source=str(root), val_fraction=0.0, test_fraction=0.0)
    datasets = build_datasets(cfg, ImagePreprocessor(8, *MEAN_STD), seed=0)
    message = data_error_text(datasets.train.take_all)
    assert f"{root / 'b' / 'broken.png'}: unreadable image" in message and ", row" not in message
    skipping = build_datasets(cfg.model_copy(update={"on_bad_rows": "skip"}), ImagePreprocessor(8, *MEAN_STD), seed=0)
    assert len(skipping.train.take_all()) == 6 and skipping.skipped_rows()["counts"] == {"train": 1}


def test_empty_labels_and_missing_text_skipped_in_jsonl(ray_session, tmp_path, tiny_bert_dir):
    rows = sentiment_rows(30)
    rows[4]["sentiment"] = ""
    rows[7]["sentiment"] = None
    rows[9]["review"] = None
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = DataConfig(source=str(path), text_column="review", label_column="sentiment", val_fraction=0.0,
                     test_fraction=0.0, on_bad_rows="skip")  # fmt: skip
    datasets = build_datasets(cfg, TextPreprocessor(str(tiny_bert_dir), 16), seed=0)
    assert len(datasets.train.take_all()) == 27
    assert datasets.skipped_rows()["counts"] == {"train": 3}
    strict = cfg.model_copy(update={"on_bad_rows": "error"})
    # the training rows are counted while the datasets are built: the error comes before training
    message = data_error_text(lambda: build_datasets(strict, TextPreprocessor(str(tiny_bert_dir), 16), seed=0))
    assert f"{path}, row 4: empty label" in message


def test_label_column_of_the_wrong_type(ray_session, tmp_path):
    rows = [{"review": f"text {i}", "score": i / 10} for i in range(10)]
    path = write_csv(tmp_path / "scores.csv", rows)
    with pytest.raises(DataError, match=r"scores.csv: label column 'score' holds double values; classification labels"):
        load_source(DataConfig(source=str(path), text_column="review", label_column="score"), seed=0)


def test_uri_sources_and_folders_of_files(ray_session, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = sentiment_rows(60)
    write_csv(folder / "a.csv", rows[:30])
    write_csv(folder / "b.csv", rows[30:])
    cfg = DataConfig(source=f"file://{folder}", text_column="review", label_column="sentiment",
                     val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    source = load_source(cfg, seed=0)
    texts = sorted(r["text"] for r in source.splits["train"].take_all())
    assert texts == sorted(r["review"] for r in rows)
    numbered = source.splits["train"].take_all()
    assert {(r["__file"].rsplit("/", 1)[-1], r["__row"]) for r in numbered} == {
        (name, i) for name in ("a.csv", "b.csv") for i in range(30)
    }


def test_evaluation_reuses_the_trained_labels(ray_session, tmp_path, tiny_bert_dir):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40))
    test = write_csv(tmp_path / "test.csv", [{"review": "good film", "sentiment": "meh"}])
    cfg = DataConfig(source=str(train), text_column="review", label_column="sentiment")
    preprocessor = TextPreprocessor(str(tiny_bert_dir), 16)
    assert build_datasets(cfg, preprocessor, seed=0, label_names=["neg", "pos"]).label_names == ["neg", "pos"]
    with_test = cfg.model_copy(update={"test_source": str(test)})
    message = data_error_text(lambda: build_datasets(with_test, preprocessor, seed=0, label_names=["neg", "pos"]))
    assert message == f"{test}: label 'meh' is not one of the training labels ['neg', 'pos']"


def test_unreadable_image_in_predict_is_named(tmp_path):
    preprocessor = ImagePreprocessor(8, *MEAN_STD)
    good = np.frombuffer(png_bytes((1, 2, 3)), dtype=np.uint8)
    from finetune.data.rows import BadRows

    with pytest.raises(BadRows) as error:
        preprocessor.encode([good.tobytes(), b"junk"])
    assert list(error.value.rows) == [1]
