import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import data_error_text, sentiment_rows, write_csv, write_jsonl
from finetune.config import DataConfig
from finetune.data import DataError, ImagePreprocessor, TextPreprocessor, trim_padding
from finetune.data.datasets import build_datasets
from finetune.data.sources import load_source
from finetune.data.catalog import FASHION_MNIST_DIRS
from finetune.data.readers import infer_format
from finetune.data.splits import split_mask


def rows_of(ds) -> list[dict]:
    return ds.take_all()


def texts(source, split) -> set[str]:
    return {r["text"] for r in rows_of(source.splits[split])}


def text_cfg(path, **extra) -> DataConfig:
    return DataConfig(source=str(path), text_column="review", label_column="sentiment", **extra)


def test_split_is_seeded_disjoint_and_complete():
    keys = [f"row {i}" for i in range(5000)]
    masks = {s: split_mask(keys, 7, s, 0.1, 0.2) for s in ("train", "val", "test")}
    assert (masks["train"].astype(int) + masks["val"] + masks["test"] == 1).all()
    assert abs(masks["test"].mean() - 0.2) < 0.02 and abs(masks["val"].mean() - 0.1) < 0.02
    assert (split_mask(keys, 7, "test", 0.1, 0.2) == masks["test"]).all()
    assert (split_mask(keys, 8, "test", 0.1, 0.2) != masks["test"]).any()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_table_files_split_by_seed(ray_session, tmp_path, fmt):
    rows = sentiment_rows(300)
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert infer_format(str(path)) == fmt
    source = load_source(text_cfg(path, val_fraction=0.2, test_fraction=0.2), seed=3)
    assert source.kind == "text"
    assert source.label_names == ["neg", "pos"]
    parts = {split: texts(source, split) for split in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
    assert set().union(*parts.values()) == {r["review"] for r in rows}
    assert 30 < len(parts["test"]) < 90
    again = load_source(text_cfg(path, val_fraction=0.2, test_fraction=0.2), seed=3)
    assert texts(again, "test") == parts["test"]
    label_of = {r["review"]: r["sentiment"] for r in rows}
    for row in rows_of(source.splits["val"]):
        assert source.label_names[row["label"]] == label_of[row["text"]]


def test_explicit_val_and_test_files(ray_session, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(100, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(20, seed=2))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(30, seed=3))
    source = load_source(text_cfg(train, val_source=str(val), test_source=str(test)), seed=0)
    assert source.splits["train"].count() == 100
    assert source.splits["val"].count() == 20
    assert source.splits["test"].count() == 30


def test_missing_column_names_the_file_and_columns(ray_session, sentiment_csv):
    with pytest.raises(DataError, match=r"reviews.csv: column 'body' not found; its columns are 'review', 'sentiment'"):
        load_source(DataConfig(source=str(sentiment_csv), text_column="body", label_column="sentiment"), seed=0)


def test_unknown_label_in_test_file_is_a_data_error(ray_session, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40))
    test = write_csv(tmp_path / "test.csv", [{"review": "good film", "sentiment": "meh"}])
    # found while the splits are set up, before anything trains
    message = data_error_text(lambda: load_source(text_cfg(train, test_source=str(test)), seed=0))
    assert message == f"{test}: label 'meh' is not one of the training labels ['neg', 'pos']"


def test_empty_labels_are_refused_by_file_and_row(ray_session, tmp_path):
    rows = [{"review": "good", "sentiment": "pos"}, {"review": "bad", "sentiment": "neg"}, {"review": "meh", "sentiment": ""}]
    path = write_csv(tmp_path / "train.csv", rows)
    source = load_source(text_cfg(path, val_fraction=0.0, test_fraction=0.0), seed=0)
    message = data_error_text(source.splits["train"].take_all)
    assert message == f"{path}, row 2: empty label (set data.on_bad_rows=skip to drop such rows)"


def test_numeric_labels_sort_as_numbers(ray_session, tmp_path):
    rows = [{"review": f"text {i}", "sentiment": [2, 10, 1][i % 3]} for i in range(30)]
    source = load_source(text_cfg(write_csv(tmp_path / "n.csv", rows)), seed=0)
    assert source.label_names == ["1", "2", "10"]


def test_image_folder(ray_session, tmp_path):
    root = tmp_path / "images"
    for name, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (20 + i, 16), color).save(root / name / f"{i}.png")
    cfg = DataConfig(source=str(root), val_fraction=0.25, test_fraction=0.25)
    assert infer_format(str(root)) == "image_folder"
    preprocessor = ImagePreprocessor(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    datasets = build_datasets(cfg, preprocessor, seed=0)
    assert datasets.label_names == ["cat", "dog"]
    counts = {s: ds.count() for s, ds in datasets.as_dict().items()}
    assert sum(counts.values()) == 24 and min(counts.values()) > 0
    batch = next(iter(datasets.train.iter_torch_batches(batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    # red images are cats: their red channel is high after normalisation
    for pixels, label in zip(batch["pixel_values"], batch["label"]):
        assert (pixels[0].mean() > pixels[2].mean()) == (label.item() == 0)

    def split_files(folder):  # a folder moved elsewhere keeps its split
        splits = load_source(DataConfig(source=str(folder), val_fraction=0.25, test_fraction=0.25), seed=0).splits
        return {name: sorted(Path(r["__file"]).relative_to(folder).as_posix() for r in ds.take_all())
                for name, ds in splits.items()}  # fmt: skip

    shutil.copytree(root, tmp_path / "moved" / "photos")
    assert split_files(root) == split_files(tmp_path / "moved" / "photos")


def test_max_samples_cap_each_split(ray_session, sentiment_csv):
    source = load_source(text_cfg(sentiment_csv, max_train_samples=50, max_eval_samples=10), seed=0)
    assert [source.splits[s].count() for s in ("train", "val", "test")] == [50, 10, 10]


def test_text_preprocessing_and_dynamic_padding(tiny_bert_dir):
    preprocessor = TextPreprocessor(str(tiny_bert_dir), max_length=16)
    out = preprocessor({"text": np.array(["good movie", "the plot was really quite dull"], dtype=object), "label": np.array([1, 0])})
    assert out["input_ids"].shape == (2, 16)
    trimmed = trim_padding({k: torch.from_numpy(v) for k, v in out.items()})
    assert trimmed["input_ids"].shape == (2, 8)  # [CLS] + 6 words + [SEP]
    assert trimmed["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert trimmed["label"].tolist() == [1, 0]


def test_image_preprocessing_normalises_grey_arrays():
    preprocessor = ImagePreprocessor(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    grey = np.full((2, 6, 6), 255, dtype=np.uint8)
    out = preprocessor({"image": grey, "label": np.array([0, 1])})
    assert out["pixel_values"].shape == (2, 3, 4, 4)
    assert np.allclose(out["pixel_values"], 2.0)


def test_rotten_tomatoes_catalog(ray_session):
    source = load_source(DataConfig(source="rotten_tomatoes"), seed=0)
    assert source.kind == "text" and source.label_names == ["fresh", "rotten"]
    counts = {s: ds.count() for s, ds in source.splits.items()}
    assert 12000 < sum(counts.values()) <= 12808
    assert 1100 < counts["test"] < 1500


@pytest.mark.skipif(not any(Path(d).is_dir() for d in FASHION_MNIST_DIRS), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_catalog(ray_session):
    source = load_source(DataConfig(source="fashion_mnist", max_eval_samples=100), seed=0)
    assert source.kind == "image" and len(source.label_names) == 10
    assert source.splits["train"].count() == pytest.approx(54000, abs=300)  # 10% of train is val
    row = source.splits["test"].take(1)[0]
    assert row["image"].shape == (28, 28) and row["image"].dtype == np.uint8


# ---- multi-label and regression labels


def test_multi_label_columns_are_lists_or_delimited_strings(ray_session, tmp_path):
    rows = [{"text": "a", "tags": "drama|comedy"}, {"text": "b", "tags": "comedy"}, {"text": "c", "tags": ""},
            {"text": "d", "tags": " horror | drama "}]  # fmt: skip
    csv_cfg = DataConfig(source=str(write_csv(tmp_path / "t.csv", rows)), label_column="tags",
                         val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    as_lists = [{"text": r["text"], "tags": [t.strip() for t in r["tags"].split("|") if t.strip()]} for r in rows]
    jsonl_cfg = csv_cfg.model_copy(update={"source": str(write_jsonl(tmp_path / "t.jsonl", as_lists))})
    for cfg in (csv_cfg, jsonl_cfg):
        source = load_source(cfg, seed=0, task="multi_label")
        assert source.label_names == ["comedy", "drama", "horror"]
        encoded = {r["text"]: r["label"].tolist() for r in rows_of(source.splits["train"])}
        # an empty string or list: no label applies (a row of zeros), not a bad row
        assert encoded == {"a": [1, 1, 0], "b": [1, 0, 0], "c": [0, 0, 0], "d": [0, 1, 1]}
    datasets = build_datasets(csv_cfg, TextPreprocessor(_tokenizer_dir(tmp_path), 8), seed=0, task="multi_label")
    assert datasets.label_stats() == {"rows": 4, "sums": [2.0, 2.0, 1.0], "squares": 0.0}
    # a label the training split does not have is named; so is a missing (null) label
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "e", "tags": ["western"]}])
    unknown = jsonl_cfg.model_copy(update={"test_source": str(test)})
    message = data_error_text(lambda: load_source(unknown, seed=0, task="multi_label"))
    assert message == f"{test}: label 'western' is not one of the training labels ['comedy', 'drama', 'horror']"
    missing = write_jsonl(tmp_path / "missing.jsonl", [*as_lists, {"text": "f", "tags": None}])
    source = load_source(jsonl_cfg.model_copy(update={"source": str(missing)}), seed=0, task="multi_label")
    assert "missing.jsonl, row 4: empty label" in data_error_text(source.splits["train"].take_all)


def _tokenizer_dir(tmp_path) -> str:
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_regression_targets_are_numbers(ray_session, tmp_path):
    rows = [{"text": t, "price": p} for t, p in (("a", 1.5), ("b", 2.5), ("c", 4.0), ("d", 8))]
    cfg = DataConfig(source=str(write_csv(tmp_path / "p.csv", rows)), label_column="price",
                     val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    source = load_source(cfg, seed=0, task="regression")
    assert source.label_names == ["price"]  # one output, named after the target
    assert sorted(r["label"] for r in rows_of(source.splits["train"])) == [1.5, 2.5, 4.0, 8.0]
    datasets = build_datasets(cfg, TextPreprocessor(_tokenizer_dir(tmp_path), 8), seed=0, task="regression")
    assert datasets.label_stats() == {"rows": 4, "sums": [16.0], "squares": pytest.approx(1.5**2 + 2.5**2 + 16 + 64)}
    words = write_csv(tmp_path / "w.csv", [{"text": "a", "price": "cheap"}])
    with pytest.raises(DataError, match=r"label column 'price' holds string values; regression targets are numbers"):
        load_source(cfg.model_copy(update={"source": str(words)}), seed=0, task="regression")
    gap = write_csv(tmp_path / "gap.csv", [*rows, {"text": "e", "price": ""}])
    source = load_source(cfg.model_copy(update={"source": str(gap)}), seed=0, task="regression")
    assert "gap.csv, row 4: no target (an empty cell or NaN)" in data_error_text(source.splits["train"].take_all)
    with pytest.raises(DataError, match="rotten_tomatoes is a classification dataset"):
        load_source(DataConfig(source="rotten_tomatoes"), seed=0, task="regression")


def _token_batches(lengths: list[int], batch_size: int, width: int = 12) -> list[dict[str, torch.Tensor]]:
    """Right-padded token batches whose rows hold `lengths` tokens, each token the row's number + 1
    (so a row is known by its ids); labels alternate."""
    rows = torch.arange(len(lengths))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = (rows[:, None] + 1) * mask
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size],
             "label": rows[i : i + batch_size] % 2} for i in range(0, len(lengths), batch_size)]  # fmt: skip


def _row_numbers(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].max(dim=1).values - 1


def test_group_by_length_keeps_every_row_and_batch_and_pads_less():
    from finetune.data.lengths import group_by_length

    lengths = [random.Random(i).randint(1, 12) for i in range(200)]
    batches = _token_batches(lengths, 8)[:-1]  # full batches only, as training reads them
    grouped = list(group_by_length(batches, seed=3))
    assert [len(b["label"]) for b in grouped] == [len(b["label"]) for b in batches]  # DDP ranks keep equal steps
    assert sorted(torch.cat([_row_numbers(b) for b in grouped]).tolist()) == list(range(len(batches) * 8))
    for batch in grouped:  # each row keeps its own tokens, mask and label
        assert torch.equal(batch["attention_mask"].sum(dim=1), torch.tensor([lengths[r] for r in _row_numbers(batch)]))
        assert torch.equal(batch["label"], _row_numbers(batch) % 2)
    padded = lambda bs: sum(trim_padding(b)["input_ids"].numel() for b in bs)  # noqa: E731
    assert padded(grouped) < 0.75 * padded(batches)
    order = [_row_numbers(b).tolist() for b in grouped]
    assert [_row_numbers(b).tolist() for b in group_by_length(batches, seed=3)] == order  # seeded
    assert [_row_numbers(b).tolist() for b in group_by_length(batches, seed=4)] != order
    images = [{"pixel_values": torch.rand(2, 3, 4, 4), "label": torch.tensor([0, 1])}]
    assert list(group_by_length(images, seed=0)) == images  # no attention mask: as they came


def test_evaluation_sorts_texts_by_length_and_returns_rows_in_their_order():
    import torch.nn.functional as F

    from finetune.tasks.classification import Classification
    from finetune.training.steps import evaluate_rows

    widths = []

    class RowModel(torch.nn.Module):  # logits from the row's own tokens, whatever the padding around them
        def forward(self, input_ids, attention_mask):
            widths.append(input_ids.shape[1])
            return torch.stack([(input_ids * attention_mask).sum(dim=1).float() / 50, attention_mask.sum(dim=1).float()], 1)

    lengths = [random.Random(i).randint(1, 12) for i in range(45)]
    batches = _token_batches(lengths, 4)
    task, model = Classification(["a", "b"]), RowModel()
    rows = evaluate_rows(model, batches, task, device=torch.device("cpu"), precision="fp32")
    expected = torch.cat([model(b["input_ids"], b["attention_mask"]) for b in batches])
    targets = torch.cat([b["label"] for b in batches])
    assert rows["target"].tolist() == targets.tolist()  # the order the rows came in
    torch.testing.assert_close(rows["loss"], F.cross_entropy(expected, targets, reduction="none"))
    evaluated = widths[: -len(batches)]
    assert sum(evaluated) < sum(max(lengths[i : i + 4]) for i in range(0, 45, 4))  # sorted batches pad less
    cut = evaluate_rows(model, batches, task, device=torch.device("cpu"), precision="fp32", max_rows=10)
    assert cut["target"].tolist() == targets[:10].tolist()
