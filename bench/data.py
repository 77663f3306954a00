"""Is the Ray Data pipeline fast and lean enough to never starve training?

Four measurements, each in a fresh process (and a fresh Ray where Ray is used):

  images  images/s of the project's image pipeline (Parquet of PNG bytes -> decode -> augment
          -> normalise, `finetune.data.build_datasets`) vs torch.utils.data.DataLoader with
          num_workers = cores running the same `ImagePreprocessor` per image, same images;
  text    tokens/s of the text pipeline (Rotten Tomatoes -> MiniLM tokenizer in map_batches)
          vs a DataLoader tokenizing each batch in its collate_fn;
  padding MiniLM forward+backward on batches padded to max_length vs trimmed per batch
          (dynamic padding, what training does);
  stream  peak resident memory (driver + every Ray process) while one epoch of a generated
          Parquet image dataset several times larger than Ray's object store streams through
          preprocessing, at 1x and 4x the data size.

    .venv/bin/python bench/data.py                       # all three (about 6 minutes on 2 cores)
    .venv/bin/python bench/data.py --only images --images 4000

The last line printed is one JSON object with images_per_s_ray, images_per_s_dataloader,
ratio, tokens_per_s_ray, tokens_per_s_dataloader, text_ratio, peak_rss_mb_1x, peak_rss_mb_4x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

AUGMENT = [{"name": "random_resized_crop", "scale": [0.5, 1.0]}, {"name": "horizontal_flip"},
           {"name": "trivial_augment"}]  # fmt: skip
IMAGE_SIZE = 64
BATCH = 64


def _png_parquet(folder: Path, count: int, side: int, noise: bool = False, per_file: int = 250) -> Path:
    """A folder of Parquet files holding `count` PNG-encoded images with labels: Fashion-MNIST
    pictures, or random noise (incompressible: the data's size is what `side` makes it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    if noise:
        pictures = (rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(count))
    else:
        from finetune.data.catalog import fashion_mnist_arrays

        images, _ = fashion_mnist_arrays("train")
        pictures = (images[i % len(images)] for i in range(count))
    chunk: list[dict] = []
    for i, picture in enumerate(pictures):
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
        chunk.append({"image": buffer.getvalue(), "label": str(i % 10)})
        if len(chunk) == per_file or i == count - 1:
            pq.write_table(pa.Table.from_pylist(chunk), folder / f"part-{i // per_file:05d}.parquet", row_group_size=50)
            chunk = []
    return folder


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


def _image_cfg(path: Path, **extra):
    from finetune.config import DataConfig

    return DataConfig(source=str(path), val_fraction=0.0, test_fraction=0.0, image_size=IMAGE_SIZE,
                      augment=AUGMENT, shuffle="none", **extra)  # fmt: skip


def _init_ray(**kwargs) -> None:
    import ray

    ray.init(log_to_driver=False, logging_level="ERROR", include_dashboard=False, **kwargs)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _rate(batches, count_of, rows: int) -> dict:
    """Items/s over the whole pass (start-up included: worker processes, tasks, first batch) and
    in steady state (after the first quarter of the batches, when the pipeline runs at its pace;
    the consumer only counts, so nothing piles up ahead of it beyond the prefetch window)."""
    started, items, seen, steady_from, steady_items = time.perf_counter(), 0, 0, None, 0
    for batch in batches:
        items += count_of(batch)
        seen += 1
        if steady_from is None and seen >= rows // BATCH // 4:
            steady_from, steady_items = time.perf_counter(), items
    ended = time.perf_counter()
    return {"total": items / (ended - started), "steady": (items - steady_items) / (ended - steady_from)}


# ---------------------------------------------------------------- images


def ray_images(path: Path) -> dict:
    from finetune.data import ImagePreprocessor
    from finetune.data.datasets import build_datasets
    from finetune.models.vision import LITE_MEAN, LITE_STD

    _init_ray()
    datasets = build_datasets(_image_cfg(path), ImagePreprocessor(IMAGE_SIZE, LITE_MEAN, LITE_STD), seed=0)
    batches = datasets.train.iter_torch_batches(batch_size=BATCH, prefetch_batches=4)
    return _rate(batches, lambda batch: len(batch["label"]), datasets.train_rows)


class _PerImage:
    """A map-style dataset running the same preprocessor on one image at a time."""

    def __init__(self, path: Path, preprocessor):
        import pyarrow.parquet as pq

        table = pq.read_table(path)  # a folder of Parquet files
        self.images, self.labels = table["image"].to_pylist(), table["label"].to_pylist()
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        out = self.preprocessor({"image": [self.images[index]]})
        return out["pixel_values"][0], int(self.labels[index])


def dataloader_images(path: Path) -> dict:
    import torch

    from finetune.data import ImagePreprocessor
    from finetune.models.vision import LITE_MEAN, LITE_STD

    specs = tuple(spec.model_dump() for spec in _image_cfg(path).augment)
    dataset = _PerImage(path, ImagePreprocessor(IMAGE_SIZE, LITE_MEAN, LITE_STD, augment=specs))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=os.cpu_count(), prefetch_factor=4)
    return _rate(loader, lambda batch: len(batch[1]), len(dataset))


# ---------------------------------------------------------------- text


def _text_rows(count: int) -> list[str]:
    from finetune.data.catalog import rotten_tomatoes_rows

    texts, _ = rotten_tomatoes_rows()
    return [texts[i % len(texts)] for i in range(count)]


def ray_tokens(count: int) -> dict:
    from finetune import models
    from finetune.config import DataConfig, ModelConfig
    from finetune.data.datasets import build_datasets

    _init_ray()
    cfg = DataConfig(source="rotten_tomatoes", max_length=64, val_fraction=0.0, test_fraction=0.0,
                     max_train_samples=count, shuffle="none")  # fmt: skip
    preprocessor = models.build_preprocessor(ModelConfig(name="minilm-l6"), cfg)
    datasets = build_datasets(cfg, preprocessor, seed=0)
    batches = datasets.train.iter_torch_batches(batch_size=BATCH, prefetch_batches=4)
    return _rate(batches, lambda batch: int(batch["attention_mask"].sum()), count)


def dataloader_tokens(count: int) -> dict:
    import torch

    from finetune import models
    from finetune.config import DataConfig, ModelConfig

    preprocessor = models.build_preprocessor(ModelConfig(name="minilm-l6"), DataConfig(source="x", max_length=64))

    def collate(texts: list[str]) -> dict:
        return preprocessor({"text": np.array(texts, dtype=object)})

    texts = _text_rows(count)
    loader = torch.utils.data.DataLoader(texts, batch_size=BATCH, num_workers=os.cpu_count(), collate_fn=collate,
                                         prefetch_factor=4)  # fmt: skip
    return _rate(loader, lambda batch: int(batch["attention_mask"].sum()), count)


def padding_speedup(count: int = 640, max_length: int = 128) -> dict:
    """MiniLM forward+backward samples/s on Rotten Tomatoes batches padded to max_length vs
    trimmed to each batch's longest text (what the training loop does)."""
    import torch

    from finetune import models
    from finetune.config import DataConfig, ModelConfig
    from finetune.data import trim_padding

    model_cfg = ModelConfig(name="minilm-l6")
    preprocessor = models.build_preprocessor(model_cfg, DataConfig(source="x", max_length=max_length))
    model = models.build_model(model_cfg, num_labels=2)
    encoded = preprocessor({"text": np.array(_text_rows(count), dtype=object)})
    batches = [{k: torch.from_numpy(v[i : i + 32]) for k, v in encoded.items()} for i in range(0, count, 32)]
    rates = {}
    for name, prepare in (("padded", lambda b: b), ("trimmed", trim_padding)):
        started = time.perf_counter()
        for batch in batches:
            model(**prepare(batch)).float().sum().backward()
        rates[name] = count / (time.perf_counter() - started)
    return {"max_length": max_length, "samples_per_s_padded": round(rates["padded"], 1),
            "samples_per_s_trimmed": round(rates["trimmed"], 1),
            "padding_speedup": round(rates["trimmed"] / rates["padded"], 2)}  # fmt: skip


# ---------------------------------------------------------------- streaming memory


def _memory_mb() -> tuple[float, float]:
    """(RSS, PSS) summed over this process and its descendants: the Ray it started (GCS, raylet,
    object store, workers). PSS splits shared pages (the object store's memory map) among the
    processes that map them, so it does not count them once per process as RSS does."""
    import psutil

    me = psutil.Process()
    rss = pss = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss / 2**20, pss / 2**20


def stream_epoch(path: Path, object_store_mb: int) -> dict:
    from finetune.data import ImagePreprocessor
    from finetune.data.datasets import build_datasets
    from finetune.models.vision import LITE_MEAN, LITE_STD

    _init_ray(object_store_memory=object_store_mb * 2**20)
    peak = {"rss": 0.0, "pss": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss = _memory_mb()
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    datasets = build_datasets(_image_cfg(path), ImagePreprocessor(IMAGE_SIZE, LITE_MEAN, LITE_STD), seed=0)
    started, rows = time.perf_counter(), 0
    for batch in datasets.train.iter_torch_batches(batch_size=BATCH):
        rows += len(batch["label"])
    done.set()
    sampler.join()
    return {"rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak["rss"]), "peak_pss_mb": round(peak["pss"])}  # fmt: skip


# ---------------------------------------------------------------- driver


def _in_subprocess(function: str, *args) -> object:
    """Run `function(*args)` of this file in a fresh interpreter (a fresh Ray); its JSON result."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import data; " \
           f"print('RESULT ' + json.dumps(data.{function}(*{args!r})))"  # fmt: skip
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{function} failed:\n{output.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["images", "text", "padding", "stream"]
    parser.add_argument("--only", choices=parts, nargs="+", default=parts)
    parser.add_argument("--images", type=int, default=24000, help="images in the throughput comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each images pipeline; medians reported")
    parser.add_argument("--texts", type=int, default=10000, help="texts in the tokens/s comparison")
    parser.add_argument("--stream-images", type=int, default=1500, help="images (256 px noise PNG) at 1x")
    parser.add_argument("--object-store-mb", type=int, default=100, help="Ray's object store cap for 'stream'")
    args = parser.parse_args()
    result: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        if "images" in args.only:
            path = str(_png_parquet(Path(tmp) / "fashion", args.images, 28))
            runs: dict[str, list[dict]] = {"ray": [], "dataloader": []}
            for _ in range(args.repeats):  # alternated, so a noisy spell on the machine hits both
                runs["dataloader"].append(_in_subprocess("dataloader_images", path))
                runs["ray"].append(_in_subprocess("ray_images", path))
            median = {(name, kind): statistics.median(run[kind] for run in rates)
                      for name, rates in runs.items() for kind in ("steady", "total")}  # fmt: skip
            result.update({
                "images_per_s_ray": round(median["ray", "steady"], 1),
                "images_per_s_dataloader": round(median["dataloader", "steady"], 1),
                "ratio": round(median["ray", "steady"] / median["dataloader", "steady"], 3),
                "images_per_s_ray_with_startup": round(median["ray", "total"], 1),
                "images_per_s_dataloader_with_startup": round(median["dataloader", "total"], 1),
                "ratio_with_startup": round(median["ray", "total"] / median["dataloader", "total"], 3),
                "images_repeats_steady": {name: [round(run["steady"]) for run in rates] for name, rates in runs.items()},
            })  # fmt: skip
            print(json.dumps({k: v for k, v in result.items() if "images" in k or "ratio" in k}), flush=True)
        if "text" in args.only:
            loader, ray_rate = _in_subprocess("dataloader_tokens", args.texts), _in_subprocess("ray_tokens", args.texts)
            result.update({
                "tokens_per_s_ray": round(ray_rate["steady"]), "tokens_per_s_dataloader": round(loader["steady"]),
                "text_ratio": round(ray_rate["steady"] / loader["steady"], 3),
                "text_ratio_with_startup": round(ray_rate["total"] / loader["total"], 3),
            })  # fmt: skip
            print(json.dumps({k: v for k, v in result.items() if "token" in k or "text" in k}), flush=True)
        if "padding" in args.only:
            padding = _in_subprocess("padding_speedup")
            result.update(padding)
            print(json.dumps(padding), flush=True)
        if "stream" in args.only:
            for scale in (1, 4):
                path = _png_parquet(Path(tmp) / f"noise{scale}", args.stream_images * scale, 256, noise=True)
                size_mb = _folder_mb(path)
                run = _in_subprocess("stream_epoch", str(path), args.object_store_mb)
                result[f"data_mb_{scale}x"] = round(size_mb)
                result[f"peak_rss_mb_{scale}x"] = run["peak_rss_mb"]
                result[f"peak_pss_mb_{scale}x"] = run["peak_pss_mb"]
                result[f"stream_images_per_s_{scale}x"] = round(run["rows"] / run["seconds"], 1)
                print(json.dumps({"scale": scale, "data_mb": round(size_mb), **run}), flush=True)
                shutil.rmtree(path)
            result["object_store_mb"] = args.object_store_mb
    print(json.dumps(result))


if __name__ == "__main__":
    main()
