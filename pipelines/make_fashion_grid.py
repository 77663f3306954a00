"""Write the multi-label dataset of pipelines/fashion-grid-multilabel.yaml: 2x2 grids of
Fashion-MNIST items, labelled with the garment classes they show.

Each 56x56 grey PNG holds 1-4 items (every cell filled with probability 1/2, at least one),
drawn from Fashion-MNIST's official train split for train.parquet and from its official test
split for test.parquet, so no item is in both. Columns: `image` (PNG bytes) and `labels` (a
list of class names, each once). Seeded: the same files on every machine.

    python pipelines/make_fashion_grid.py data/fashion-grid [--train-rows 12000 --test-rows 2000]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from finetune.data.catalog import FASHION_MNIST_CLASSES, fashion_mnist_arrays

CELL, SIDE = 28, 2  # a 2x2 grid of 28 px items


def grid_rows(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for _ in range(count):
        filled = rng.random(SIDE * SIDE) < 0.5
        while not filled.any():
            filled = rng.random(SIDE * SIDE) < 0.5
        canvas = np.zeros((CELL * SIDE, CELL * SIDE), dtype=np.uint8)
        present = set()
        for cell in np.flatnonzero(filled):
            item = rng.integers(len(images))
            row, column = divmod(int(cell), SIDE)
            canvas[row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = images[item]
            present.add(int(labels[item]))
        buffer = io.BytesIO()
        Image.fromarray(canvas, mode="L").save(buffer, format="PNG")
        rows.append({"image": buffer.getvalue(), "labels": [FASHION_MNIST_CLASSES[c] for c in sorted(present)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-rows", type=int, default=12000)
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for name, prefix, count in (("train", "train", args.train_rows), ("test", "t10k", args.test_rows)):
        images, labels = fashion_mnist_arrays(prefix)
        table = pa.Table.from_pylist(grid_rows(images, labels, count, rng))
        pq.write_table(table, args.out / f"{name}.parquet")
        print(f"{args.out / f'{name}.parquet'}: {count} images")


if __name__ == "__main__":
    main()
