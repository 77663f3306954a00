"""Write a small image folder as users bring one, for pipelines/fashion-folder-small.yaml:
`train/<class>/<n>.png` and `test/<class>/<n>.png`, greyscale PNGs of Fashion-MNIST items
(dark backgrounds: statistics far from ImageNet's), the training images drawn from the
official train split and the test images from the official test split. Seeded: the same
files on every machine.

    python pipelines/make_fashion_folder.py data/fashion-folder [--train-images 1000 --test-images 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.catalog import FASHION_MNIST_CLASSES, fashion_mnist_arrays


def write_folder(out: Path, prefix: str, count: int, classes: list[str], rng: np.random.Generator) -> None:
    """`count` images spread evenly over `classes`, as out/<class>/<n>.png."""
    images, labels = fashion_mnist_arrays(prefix)
    names = [FASHION_MNIST_CLASSES[label] for label in labels]
    per_class = count // len(classes)
    for name in classes:
        folder = out / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        chosen = rng.choice(np.flatnonzero(np.asarray(names) == name), size=per_class, replace=False)
        for n, index in enumerate(chosen):
            Image.fromarray(images[index], mode="L").save(folder / f"{n:05d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=len(FASHION_MNIST_CLASSES), help="the first N classes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    classes = FASHION_MNIST_CLASSES[: args.classes]
    for split, prefix, count in (("train", "train", args.train_images), ("test", "t10k", args.test_images)):
        write_folder(args.out / split, prefix, count, classes, rng)
        print(f"{args.out / split}: {count // len(classes) * len(classes)} images of {len(classes)} classes")


if __name__ == "__main__":
    main()
