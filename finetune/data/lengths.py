"""Batches of texts of similar length. A batch is padded to its longest text, so batches drawn at
random compute on about twice the tokens their texts hold (Rotten Tomatoes snippets at 64 tokens,
batch 64: 2.0x); sorted within groups of batches, on 1.1x (docs/BENCHMARKS.md). Plain PyTorch,
on the batches a worker already holds; batches without an attention mask (images) pass unchanged.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

import torch

GROUP_BATCHES = 16  # batches sorted together: the rows in flight, and how alike their lengths get


def group_by_length(batches: Iterable[dict[str, torch.Tensor]], seed: int,
                    group_batches: int = GROUP_BATCHES) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """Training: each `group_batches` batches re-cut into as many of the same sizes, each of rows of
    similar length, in a seeded random order (Hugging Face's group_by_length, with smaller groups).
    The epoch's rows and its batch count stay the same, so DDP ranks still take equal steps."""
    rng = random.Random(seed)
    for group, is_text in _text_groups(batches, group_batches):
        if not is_text:
            yield from group
            continue
        merged, order = _by_length(group)
        recut, start = [], 0
        for batch in group:
            rows = order[start : start + len(batch["attention_mask"])]
            recut.append({name: values[rows] for name, values in merged.items()})
            start += len(rows)
        rng.shuffle(recut)
        yield from recut


def sorted_groups(batches: Iterable[dict[str, torch.Tensor]], group_batches: int = GROUP_BATCHES // 2,
                  ) -> Iterator[tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]]:  # fmt: skip
    """Evaluation: groups of `group_batches` batches, each group re-cut into batches of rows sorted by
    length, with the index that puts the group's per-row results back in the order the rows came
    (`results[restore]`); None for batches without an attention mask, given one at a time."""
    for group, is_text in _text_groups(batches, group_batches):
        if not is_text:
            yield group, None
            continue
        merged, order = _by_length(group)
        size = max(len(batch["attention_mask"]) for batch in group)
        ordered = {name: values[order] for name, values in merged.items()}
        yield ([{name: values[i : i + size] for name, values in ordered.items()} for i in range(0, len(order), size)],
               torch.argsort(order))  # fmt: skip


def _text_groups(batches: Iterable[dict[str, torch.Tensor]], group_batches: int,
                 ) -> Iterator[tuple[list[dict[str, torch.Tensor]], bool]]:  # fmt: skip
    """Text batches in lists of `group_batches` (the last may be shorter), True; a batch without an
    attention mask (images) alone, False."""
    group: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        if "attention_mask" not in batch:
            yield [batch], False
            continue
        group.append(batch)
        if len(group) == group_batches:
            yield group, True
            group = []
    if group:
        yield group, True


def _by_length(group: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The group's batches as one, and its rows' order from shortest to longest (ties as they came)."""
    merged = {name: torch.cat([batch[name] for batch in group]) for name in group[0]}
    return merged, torch.argsort(merged["attention_mask"].sum(dim=1), stable=True)
