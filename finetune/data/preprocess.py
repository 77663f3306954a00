"""Batch preprocessing run inside Ray Data `map_batches`: tokenize text, decode and resize images.

The model registry builds one of these from the model's own tokenizer or image
statistics and hands it to `preprocess`; this module knows no model. Each object is
small and picklable: Ray ships it to the preprocessing tasks, which load the tokenizer
once per process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import ray.data
import torch


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


@dataclass(frozen=True)
class TextPreprocessor:
    tokenizer: str  # hub id or local folder
    max_length: int = 128
    kind: str = field(default="text", init=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Padded to max_length here so blocks hold fixed-shape tensors; `trim_padding` then cuts
        # each training batch to its longest row, so compute follows the batch, not max_length.
        encoded = load_tokenizer(self.tokenizer)(
            [str(t) for t in batch["text"]],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="np",
        )
        out = {
            "input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64),
        }
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """One-off inputs (predict): tokenized and trimmed like a training batch."""
        batch = {k: torch.from_numpy(v) for k, v in self({"text": np.array(texts, dtype=object)}).items()}
        return trim_padding(batch)


@dataclass(frozen=True)
class ImagePreprocessor:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kind: str = field(default="image", init=False)

    def _to_array(self, image) -> np.ndarray:
        from PIL import Image

        if isinstance(image, (bytes, bytearray, np.bytes_)) or (
            isinstance(image, np.ndarray) and image.dtype == object
        ):
            picture = Image.open(io.BytesIO(bytes(image)))
        else:
            picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
        picture = picture.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(picture, dtype=np.uint8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = np.stack([self._to_array(image) for image in batch["image"]]).astype(np.float32) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        out = {"pixel_values": np.ascontiguousarray(pixels)}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def encode(self, images: list) -> dict[str, torch.Tensor]:
        batch = self({"image": images})
        return {"pixel_values": torch.from_numpy(batch["pixel_values"])}


Preprocessor = TextPreprocessor | ImagePreprocessor


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dynamic padding: cut padded token columns that no row in this batch uses."""
    if "attention_mask" not in batch:
        return batch
    length = int(batch["attention_mask"].sum(dim=1).max().item()) or 1
    return {k: (v[:, :length] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


def preprocess(ds: ray.data.Dataset, preprocessor: Preprocessor, batch_size: int = 256) -> ray.data.Dataset:
    """Lazy map_batches: the work runs as the training loop streams the dataset."""
    return ds.map_batches(preprocessor, batch_format="numpy", batch_size=batch_size)
