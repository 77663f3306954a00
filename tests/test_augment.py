"""Training-only augmentation, batch mixing, and per-epoch shuffling on real Ray Data pipelines."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import sentiment_rows, write_csv
from finetune import config
from finetune.config import DataConfig
from finetune.data import ImagePreprocessor, TextPreprocessor
from finetune.data.datasets import build_datasets
from finetune.data.augment import batch_mixer
from finetune.training.trainer import ingest_options

EVERY_AUGMENTATION = [
    {"name": "random_resized_crop", "scale": [0.3, 1.0]}, {"name": "horizontal_flip"}, {"name": "rotation"},
    {"name": "color_jitter"}, {"name": "rand_augment"}, {"name": "trivial_augment"}, {"name": "random_erasing", "p": 1.0},
]  # fmt: skip


@pytest.fixture
def noise_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_every_augmentation_runs_and_keeps_the_size():
    specs = tuple(config.parse({"data": {"source": "x", "augment": EVERY_AUGMENTATION}, "model": {"name": "m"}})
                  .data.model_dump()["augment"])  # fmt: skip
    preprocessor = ImagePreprocessor(16, (0.5,) * 3, (0.5,) * 3, augment=specs)
    images = np.random.default_rng(1).integers(0, 255, (6, 40, 30, 3), dtype=np.uint8)
    out = preprocessor({"image": images})["pixel_values"]
    assert out.shape == (6, 3, 16, 16) and out.dtype == np.float32
    plain = ImagePreprocessor(16, (0.5,) * 3, (0.5,) * 3)({"image": images})["pixel_values"]
    assert not np.allclose(out, plain)


def test_random_erasing_acts_on_the_normalised_image_per_image():
    erase = ({"name": "random_erasing", "p": 1.0, "scale": (0.1, 0.2)},)
    preprocessor = ImagePreprocessor(16, (0.5,) * 3, (0.5,) * 3, augment=erase)
    white = np.full((4, 16, 16, 3), 255, dtype=np.uint8)  # normalises to 1.0 everywhere
    out = preprocessor({"image": white})["pixel_values"]
    erased = out == 0.0  # erased with 0 after normalisation (before it, 0 would become -1)
    assert set(np.unique(out)) == {0.0, 1.0}
    shares = erased.mean(axis=(1, 2, 3))
    assert ((shares > 0.05) & (shares < 0.25)).all()
    assert len({erased[i].tobytes() for i in range(4)}) > 1  # a rectangle per image, not per batch


def test_augmentation_only_on_training_rows(ray_session, noise_folder):
    cfg = DataConfig(source=str(noise_folder), val_fraction=0.25, test_fraction=0.25, shuffle="none",
                     augment=[{"name": "horizontal_flip", "p": 1.0}])  # fmt: skip
    plain_cfg = cfg.model_copy(update={"augment": []})
    preprocessor = ImagePreprocessor(24, (0.5,) * 3, (0.5,) * 3)
    augmented, plain = build_datasets(cfg, preprocessor, seed=0), build_datasets(plain_cfg, preprocessor, seed=0)
    flipped = [row["pixel_values"] for row in augmented.train.take_all()]
    original = [row["pixel_values"] for row in plain.train.take_all()]
    assert len(flipped) == len(original) > 0
    for a, b in zip(flipped, original):
        np.testing.assert_array_equal(a, b[:, :, ::-1])  # every training image mirrored
    for split in ("val", "test"):
        rows_a = getattr(augmented, split).take_all()
        rows_b = getattr(plain, split).take_all()
        for a, b in zip(rows_a, rows_b):
            np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_text_models_refuse_image_augmentation(tmp_path, capsys):
    from finetune.cli import main

    path = write_csv(tmp_path / "r.csv", sentiment_rows(10))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"data: {{source: {path}}}\nmodel: {{name: minilm-l6}}\n")
    args = ["validate", str(pipeline), "data.mixup_alpha=0.2", "data.augment=[{name: horizontal_flip}]"]
    assert main(args) == 2
    out = capsys.readouterr().out
    assert "data.augment augments images; model.name=minilm-l6 takes text" in out
    assert "data.mixup_alpha augments images" in out


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_makes_soft_labels_and_the_loss_takes_them(mixup, cutmix):
    torch.manual_seed(0)
    mix = batch_mixer(mixup, cutmix, num_labels=3)
    pixels, labels = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, soft = mix({"pixel_values": pixels}, labels)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(dim=1), torch.ones(8))
    # each row mixes its own label with its neighbour's (torchvision rolls the batch by one), by
    # one weight for the whole batch: lam for mixup, the area outside the pasted box for cutmix
    lam = soft[0, labels[0]].item()
    assert 0.0 < lam < 1.0
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot.roll(1, dims=0))
    rolled = pixels.roll(1, dims=0)
    own = (mixed["pixel_values"] == pixels).all(dim=1)
    pasted = (mixed["pixel_values"] == rolled).all(dim=1)
    if cutmix > 0 and (own | pasted).all():  # cutmix (chosen): the neighbour's box covers 1 - lam of each image
        assert pasted.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
    else:  # mixup: every pixel blended by lam
        assert mixup > 0
        torch.testing.assert_close(mixed["pixel_values"], lam * pixels + (1 - lam) * rolled)
    logits = torch.randn(8, 3)
    expected = -(soft * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(torch.nn.CrossEntropyLoss()(logits, soft), expected)
    assert batch_mixer(0.0, 0.0, 3) is None


def order(ds) -> list[str]:
    return [row["text"] for row in ds.take_all()]


def test_full_shuffle_is_seeded_and_new_every_epoch(ray_session, tmp_path):
    path = write_csv(tmp_path / "r.csv", sentiment_rows(200))
    cfg = DataConfig(source=str(path), text_column="review", label_column="sentiment", shuffle="full")
    from finetune.data.sources import load_source

    source_order = order(load_source(cfg, seed=0).splits["train"])

    def raw_train(seed):
        # the shuffled raw rows, before tokenization: what build_datasets hands to preprocessing
        ds = load_source(cfg, seed=0).splits["train"]
        import ray.data

        return ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed, reseed_after_execution=True))

    shuffled = raw_train(5)
    epoch0, epoch1 = order(shuffled), order(shuffled)
    assert sorted(epoch0) == sorted(epoch1) == sorted(source_order)
    assert epoch0 != source_order and epoch1 != epoch0  # reshuffled each execution (epoch)
    again = raw_train(5)
    assert [order(again), order(again)] == [epoch0, epoch1]  # same seed, same sequence of orders


def test_build_datasets_shuffles_only_training_rows_when_full(ray_session, tmp_path, tiny_bert_dir):
    path = write_csv(tmp_path / "r.csv", sentiment_rows(200))
    preprocessor = TextPreprocessor(str(tiny_bert_dir), 16)
    ids = lambda ds: [tuple(r["input_ids"]) for r in ds.take_all()]  # noqa: E731
    kwargs = {"source": str(path), "text_column": "review", "label_column": "sentiment"}
    full = build_datasets(DataConfig(**kwargs, shuffle="full"), preprocessor, seed=0)
    none = build_datasets(DataConfig(**kwargs, shuffle="none"), preprocessor, seed=0)
    assert ids(full.train) != ids(none.train) and sorted(ids(full.train)) == sorted(ids(none.train))
    assert ids(full.val) == ids(none.val) and ids(full.test) == ids(none.test)
    assert full.train_rows == none.train_rows == len(ids(none.train))


def test_preprocess_cpus_caps_ray_data(ray_session):
    cfg = config.parse({"data": {"source": "x", "preprocess_cpus": 1.5}, "model": {"name": "m"}})
    assert ingest_options(cfg).resource_limits.cpu == 1.5
    unlimited = config.parse({"data": {"source": "x"}, "model": {"name": "m"}})
    assert ingest_options(unlimited).resource_limits.cpu == float("inf")


def test_worker_shards_are_disjoint_and_cover_the_data(ray_session, tmp_path, tiny_bert_dir):
    import threading
    from collections import Counter

    from finetune.training.trainer import ShardingConfig

    path = write_csv(tmp_path / "r.csv", sentiment_rows(301))
    cfg = DataConfig(source=str(path), text_column="review", label_column="sentiment", shuffle="full")
    datasets = build_datasets(cfg, TextPreprocessor(str(tiny_bert_dir), 16), seed=0)
    cfg_options = config.parse({"data": {"source": "x"}, "model": {"name": "m"}})
    shards = ShardingConfig(execution_options=ingest_options(cfg_options)).configure(
        datasets.as_dict(), world_size=2, worker_handles=None, worker_node_ids=None
    )
    seen: dict = {}

    def consume(rank: int) -> None:  # streaming splits are read concurrently, as workers do
        for split in ("train", "val", "test"):
            rows = [tuple(r["input_ids"]) for r in shards[rank][split].iter_rows()]
            seen[(rank, split)] = rows

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for split in ("train", "val", "test"):
        every = [tuple(r["input_ids"]) for r in getattr(datasets, split).take_all()]
        first, second = Counter(seen[(0, split)]), Counter(seen[(1, split)])
        assert first + second <= Counter(every)  # disjoint: no row read more often than it exists
        if split == "train":  # equal shards for DDP: at most one row left over
            assert first.total() == second.total() and first.total() + second.total() >= len(every) - 1
        else:  # evaluation keeps every row
            assert first + second == Counter(every)
