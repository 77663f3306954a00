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
    group: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        if "attention_mask" not in batch:
            yield batch
            continue
        group.append(batch)
        if len(group) == group_batches:
            yield from _recut(group, rng)
            group = []
    if group:
        yield from _recut(group, rng)


def _recut(group: list[dict[str, torch.Tensor]], rng: random.Random) -> list[dict[str, torch.Tensor]]:
    merged = _concat(group)
    order = torch.argsort(merged["attention_mask"].sum(dim=1), stable=True)
    batches, start = [], 0
    for size in (len(batch["attention_mask"]) for batch in group):
        rows = order[start : start + size]
        batches.append({name: values[rows] for name, values in merged.items()})
        start += size
    rng.shuffle(batches)
    return batches


def sorted_groups(batches: Iterable[dict[str, torch.Tensor]], group_batches: int = GROUP_BATCHES // 2,
                  ) -> Iterator[tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]]:  # fmt: skip
    """Evaluation: groups of `group_batches` batches, each group re-cut into batches of rows sorted by
    length, with the index that puts the group's per-row results back in the order the rows came
    (`results[restore]`); None for batches without an attention mask, given one at a time."""
    group: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        if "attention_mask" not in batch:
            yield [batch], None
            continue
        group.append(batch)
        if len(group) == group_batches:
            yield _sorted(group)
            group = []
    if group:
        yield _sorted(group)


def _sorted(group: list[dict[str, torch.Tensor]]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    merged = _concat(group)
    order = torch.argsort(merged["attention_mask"].sum(dim=1), stable=True)
    size = max(len(batch["attention_mask"]) for batch in group)
    ordered = {name: values[order] for name, values in merged.items()}
    batches = [{name: values[i : i + size] for name, values in ordered.items()} for i in range(0, len(order), size)]
    return batches, torch.argsort(order)


def _concat(group: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([batch[name] for batch in group]) for name in group[0]}
