"""Deterministic train/val/test assignment by seeded hashing.

Each row's split depends only on its key (text, image bytes or path, or an image folder's
class/file name) and the seed, never on the order rows arrive in or where the files lie, so a
split is the same in a streaming read, a re-run, and `finetune evaluate` months later. Duplicate texts land in the same split,
which keeps exact duplicates from leaking between train and test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ray.data

from finetune.data.rows import FILE

SPLITS = ("train", "val", "test")


def split_points(keys, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, fixed by (key, seed)."""
    salt = str(seed).encode()
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(str(key).encode(), digest_size=8, salt=salt[:16]).digest()
        out[i] = int.from_bytes(digest, "little") / 2**64
    return out


def split_mask(keys, seed: int, split: str, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Boolean mask of the rows that belong to `split`: test first, then val, the rest train."""
    points = split_points(keys, seed)
    if split == "test":
        return points < test_fraction
    if split == "val":
        return (points >= test_fraction) & (points < test_fraction + val_fraction)
    if split == "train":
        return points >= test_fraction + val_fraction
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


@dataclass
class Source:
    kind: Literal["text", "image"]
    label_names: list[str]
    splits: dict[str, ray.data.Dataset]  # "train" / "val" / "test"


def image_key(image) -> bytes | str:
    """What decides an image row's split: its bytes, or its path as the table writes it (a
    relative path keeps its split when the folder moves)."""
    if isinstance(image, dict):  # a Hugging Face-style image: {"bytes": ..., "path": ...}
        return bytes(image["bytes"]) if image.get("bytes") is not None else str(image.get("path"))
    return image if isinstance(image, str) else bytes(image)


def folder_key(path: str) -> str:
    """What decides an image folder row's split: its class folder and file name, not where the
    folder lies (a moved or copied folder keeps its split)."""
    parts = str(path).replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])


def hash_split(
    ds: ray.data.Dataset, key_column: str, split: str, val_fraction: float, test_fraction: float, seed: int
) -> ray.data.Dataset:
    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if key_column == FILE:
            keys = [folder_key(path) for path in batch[FILE]]
        else:
            keys = batch[key_column] if key_column == "text" else [image_key(k) for k in batch[key_column]]
        mask = split_mask(keys, seed, split, val_fraction, test_fraction)
        return {name: column[mask] for name, column in batch.items()}

    return ds.map_batches(keep, batch_format="numpy")
