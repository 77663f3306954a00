"""Batch preprocessing run inside Ray Data `map_batches`: tokenize text, decode and resize images.

The model registry builds one of these from the model's own tokenizer or image
statistics and hands it to `preprocess`; this module knows no model. Each object is
small and picklable: Ray ships it to the preprocessing tasks, which load the tokenizer
once per process.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

import numpy as np

from finetune.data import windows
from finetune.data.rows import FILE, BadRows, RowPolicy

if TYPE_CHECKING:
    import ray.data
    import torch

    from finetune.data.augment import ImageTransforms


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class TextPreprocessor:
    tokenizer: str  # hub id or local folder
    max_length: int = 128
    trust_remote_code: bool = False  # model.trust_remote_code: a tokenizer that ships code
    long_text: str = "truncate"  # data.long_text: truncate | head_tail | windows
    head_share: float = 0.25  # head_tail: the share of max_length kept from the start
    window_stride: int | None = None  # windows: tokens between window starts (None: half a window)
    max_windows: int = 8  # windows: at most this many per text
    kind: str = field(default="text", init=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = {}
        for i, text in enumerate(batch["text"]):
            if text is None or text != text:  # None or NaN
                missing[i] = "no text"
            elif not str(text).strip():
                missing[i] = "empty text"
        if missing:
            raise BadRows(missing)
        windowed = self.long_text == "windows"
        if len(batch["text"]) == 0:
            empty = np.zeros((0, self.max_length), dtype=np.int64)
            out = {"input_ids": empty, "attention_mask": empty, "label": batch.get("label", np.zeros(0, np.int64))}
            return {**out, **{column: np.zeros(0, np.int64) for column in windows.COLUMNS}} if windowed else out
        # Padded to max_length here so blocks hold fixed-shape tensors; `trim_padding` then cuts
        # each training batch to its longest row, so compute follows the batch, not max_length.
        tokenizer = load_tokenizer(self.tokenizer, self.trust_remote_code)
        texts = [str(t) for t in batch["text"]]
        owners = None  # windows: the row of `batch` each output row reads
        if self.long_text == "head_tail":
            out = self._pack(tokenizer, self._head_tail(tokenizer, texts))
        elif windowed:
            rows, owners, places = self._windows(tokenizer, texts)
            out = {**self._pack(tokenizer, rows), windows.TEXT_ID: windows.text_ids(batch)[owners], windows.WINDOW: places}
        else:
            encoded = tokenizer(texts, truncation=True, max_length=self.max_length, padding="max_length",
                                return_tensors="np")  # fmt: skip
            out = {"input_ids": encoded["input_ids"].astype(np.int64),
                   "attention_mask": encoded["attention_mask"].astype(np.int64)}  # fmt: skip
        if "label" in batch:
            out["label"] = batch["label"] if owners is None else np.asarray(batch["label"])[owners]
        return out

    def _pack(self, tokenizer, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """Token id lists of at most max_length as padded input_ids and attention_mask."""
        input_ids = np.full((len(rows), self.max_length), tokenizer.pad_token_id or 0, dtype=np.int64)
        attention_mask = np.zeros((len(rows), self.max_length), dtype=np.int64)
        for row, ids in enumerate(rows):
            place = slice(self.max_length - len(ids), None) if tokenizer.padding_side == "left" else slice(0, len(ids))
            input_ids[row, place], attention_mask[row, place] = ids, 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @staticmethod
    def _split(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int], list[int]]]:
        """Each text's tokens, uncut, as (leading special tokens, content, trailing special tokens)."""
        encoded = tokenizer(texts, truncation=False, return_special_tokens_mask=True, verbose=False)
        parts = []
        for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
            leading = next((i for i, s in enumerate(special) if not s), len(ids))
            trailing = next((i for i, s in enumerate(reversed(special)) if not s), 0)
            parts.append((ids[:leading], ids[leading : len(ids) - trailing], ids[len(ids) - trailing :]))
        return parts

    def _head_tail(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Each text's tokens, a long one cut in the middle: its special tokens, the first
        head_share of the room left and the rest from its end (Sun et al. 2019's head+tail)."""
        rows = []
        for lead, content, trail in self._split(tokenizer, texts):
            room = self.max_length - len(lead) - len(trail)
            if len(content) > room:
                head = round(room * self.head_share)
                content = content[:head] + content[len(content) - (room - head) :]
            rows.append(lead + content + trail)
        return rows

    def stride(self, room: int) -> int:
        """windows: tokens from one window's start to the next, for windows of `room` content tokens."""
        return min(self.window_stride or max(room // 2, 1), room)

    def window_room(self, tokenizer) -> int:
        """windows: a window's content tokens, max_length less a text's special tokens."""
        return self.max_length - tokenizer.num_special_tokens_to_add()

    def _windows(self, tokenizer, texts: list[str]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """Each text as overlapping windows, each with the text's special tokens: the windows' tokens,
        the text each window reads (its index in `texts`) and the window's place in that text."""
        rows, owners, places = [], [], []
        for index, (lead, content, trail) in enumerate(self._split(tokenizer, texts)):
            room = self.max_length - len(lead) - len(trail)
            starts = windows.window_starts(len(content), room, self.stride(room), self.max_windows)
            rows += [lead + content[start : start + room] + trail for start in starts]
            owners += [index] * len(starts)
            places += range(len(starts))
        return rows, np.array(owners, dtype=np.int64), np.array(places, dtype=np.int64)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """One-off inputs (predict): tokenized and trimmed like a training batch; windows: with the
        input's position as each window's text_id."""
        import torch

        batch = {"text": np.array(texts, dtype=object), windows.TEXT_ID: np.arange(len(texts))}
        return trim_padding({k: torch.from_numpy(v) for k, v in self(batch).items() if k != windows.WINDOW})

    def preview(self, inputs: dict[str, torch.Tensor]) -> dict[str, str]:
        """One row's model inputs as the report shows them: the text the model read (its tokens
        decoded: after truncation, in the tokenizer's casing)."""
        ids = inputs["input_ids"][inputs["attention_mask"].bool()].tolist()
        tokenizer = load_tokenizer(self.tokenizer, self.trust_remote_code)
        return {"text": tokenizer.decode(ids, skip_special_tokens=True)}


@dataclass(frozen=True)
class ImagePreprocessor:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: tuple[dict, ...] = ()  # data.augment entries: the training split's copy only
    kind: str = field(default="image", init=False)

    @cached_property
    def transforms(self) -> ImageTransforms:
        # imported here: torchvision (and torch._dynamo with it) costs a text pipeline's every
        # Ray Data process a second
        from finetune.data.augment import ImageTransforms

        return ImageTransforms(self.size, self.augment)

    @staticmethod
    def _decode(image, table_file: str | None = None):
        """An RGB picture from encoded bytes, a path (relative: to the folder of the table file
        that names it), a Hugging Face-style {"bytes", "path"} struct, or an array of pixels;
        turned upright as its EXIF orientation says (phone photos)."""
        from PIL import Image, ImageOps

        if isinstance(image, dict):
            image = image["bytes"] if image.get("bytes") is not None else image.get("path")
        if isinstance(image, str):
            source = io.BytesIO(_read_path(image, table_file))
        elif isinstance(image, (bytes, bytearray, np.bytes_)) or (isinstance(image, np.ndarray) and image.dtype == object):
            source = io.BytesIO(bytes(image))
        else:
            return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        return ImageOps.exif_transpose(Image.open(source)).convert("RGB")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        transforms = self.transforms
        sized, bad = [], {}
        files = batch.get(FILE)
        for i, image in enumerate(batch["image"]):
            try:
                picture = self._decode(image, None if files is None else str(files[i]))
                picture.load()
            except Exception as error:  # noqa: BLE001 - PIL raises many types for a broken file
                bad[i] = f"unreadable image ({type(error).__name__}: {error})"
                continue
            sized.append(np.asarray(transforms.to_size(picture), dtype=np.uint8))
        if bad:
            raise BadRows(bad)
        pixels = (np.stack(sized) if sized else np.zeros((0, self.size, self.size, 3))).astype(np.float32) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels = np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2))  # NHWC -> NCHW
        if transforms.erase is not None and len(pixels):  # one random rectangle per image, not per batch
            import torch

            tensor = torch.from_numpy(pixels)
            pixels = torch.stack([transforms.erase(image) for image in tensor]).numpy()
        out = {"pixel_values": pixels}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def encode(self, images: list) -> dict[str, torch.Tensor]:
        import torch

        batch = self({"image": images})
        return {"pixel_values": torch.from_numpy(batch["pixel_values"])}

    def preview(self, inputs: dict[str, torch.Tensor], size: int = 128) -> dict[str, str]:
        """One row's model inputs as the report shows them: the picture the model saw (resized,
        normalisation undone), as an inline PNG at most `size` pixels wide."""
        from PIL import Image

        pixels = inputs["pixel_values"].float().numpy().transpose(1, 2, 0)  # CHW -> HWC
        pixels = pixels * np.asarray(self.std, dtype=np.float32) + np.asarray(self.mean, dtype=np.float32)
        picture = Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))
        picture.thumbnail((size, size))
        encoded = io.BytesIO()
        picture.save(encoded, format="PNG")
        return {"image": "data:image/png;base64," + base64.b64encode(encoded.getvalue()).decode()}


Preprocessor = TextPreprocessor | ImagePreprocessor


def _read_path(path: str, table_file: str | None) -> bytes:
    """An image file's bytes: a URI (s3://, gs://, ...) or an absolute path as it is, a relative
    path from the folder of the local table that names it (else from the working directory)."""
    import pyarrow.fs as pafs

    if "://" in path:
        filesystem, path = pafs.FileSystem.from_uri(path)
    else:
        folder = os.path.dirname(table_file) if table_file and "://" not in table_file else ""
        filesystem, path = pafs.LocalFileSystem(), os.path.abspath(os.path.join(folder, os.path.expanduser(path)))
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dynamic padding: cut padded token columns that no row in this batch uses."""
    if "attention_mask" not in batch:
        return batch
    length = int(batch["attention_mask"].sum(dim=1).max().item()) or 1
    return {k: (v[:, :length] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


@dataclass(frozen=True)
class _Guarded:
    """A preprocessor applied under a bad-row policy: rows it cannot use stop the run with their
    file and row, or are dropped and logged. Its output (model inputs and label) leaves the
    provenance columns behind."""

    preprocessor: Preprocessor
    policy: RowPolicy

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            out = self.preprocessor(batch)
        except BadRows as bad:
            batch = self.policy.drop(batch, bad.rows)
            out = self.preprocessor(batch)
        return out


def preprocess(
    ds: ray.data.Dataset, preprocessor: Preprocessor, policy: RowPolicy, batch_size: int = 256
) -> ray.data.Dataset:
    """Lazy map_batches: the work runs as the training loop streams the dataset."""
    return ds.map_batches(_Guarded(preprocessor, policy), batch_format="numpy", batch_size=batch_size)
