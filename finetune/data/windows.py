"""data.long_text=windows: a long text read whole, as overlapping windows of max_length tokens.

Each window is a training row with its text's label. Evaluation and prediction average the
windows' logits per text, after the rows of every DDP rank are gathered (a text's windows may be
read by different ranks), so every metric counts texts, not windows. Two columns travel with the
windows and never reach the model: `text_id`, which text a window belongs to, and `window`, its
place in that text (0: the first).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.rows import FILE, ROW

if TYPE_CHECKING:
    import torch

TEXT_ID, WINDOW = "text_id", "window"
COLUMNS = (TEXT_ID, WINDOW)


def window_starts(length: int, room: int, stride: int, max_windows: int) -> list[int]:
    """Where each window of a text of `length` tokens starts (`room` tokens each, `stride` apart;
    the last ends with the text). Past `max_windows`, that many spread evenly from the first to the
    last, so a capped text is still read at its start and its end."""
    if length <= room:
        return [0]
    starts = list(range(0, length - room, stride)) + [length - room]
    if len(starts) > max_windows:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
    return starts


def windows_of(length: int, room: int, stride: int) -> int:
    """How many windows a text of `length` tokens needs to be read whole."""
    return 1 if length <= room else -(-(length - room) // stride) + 1


def text_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    """An id per row of a batch, the same wherever and whenever the row is read: a batch's own
    `text_id` column (predict: the inputs' positions), else a hash of the row's file and row
    number (every source carries them: finetune.data.rows), so duplicate texts stay apart."""
    if TEXT_ID in batch:
        return np.asarray(batch[TEXT_ID], dtype=np.int64)
    if FILE not in batch:
        raise ValueError("data.long_text=windows needs each row's provenance (__file, __row) to tell texts apart")
    keys = [f"{file}\0{row}" for file, row in zip(batch[FILE], batch[ROW])]
    return np.array([int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)
                     for key in keys], dtype=np.int64)  # fmt: skip


def pool(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows' logits averaged per text: (texts' logits, the texts' ids in ascending order,
    the index of each text's first row in `logits`)."""
    import torch  # here: preprocessing imports this module in Ray Data's processes, which need no torch

    texts, owner = torch.unique(ids, return_inverse=True)
    flat = logits.reshape(len(logits), -1).float()
    sums = torch.zeros(len(texts), flat.shape[1]).index_add_(0, owner, flat)
    counts = torch.bincount(owner, minlength=len(texts)).clamp(min=1)
    first = torch.full((len(texts),), len(ids), dtype=torch.long).scatter_reduce_(
        0, owner, torch.arange(len(ids)), reduce="amin"
    )
    return (sums / counts[:, None]).reshape(len(texts), *logits.shape[1:]), texts, first
