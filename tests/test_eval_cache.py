"""Evaluation batches are read from Ray Data once when they fit, and again when any rank's share did not."""

from __future__ import annotations

import torch

from finetune.train.eval_cache import EvalBatches


def _reader(batches: list[dict], reads: list[int]):
    def read():
        reads.append(1)
        yield from batches

    return read


def _batch(value: int, rows: int = 4) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((rows, 8), value), "label": torch.full((rows,), value)}


def test_a_split_that_fits_is_read_once_and_repeats_exactly():
    cache, reads = EvalBatches(agree=lambda kept: kept), []
    val = [_batch(1), _batch(2)]
    first = list(cache("val", _reader(val, reads)))
    again = list(cache("val", _reader(val, reads)))
    assert len(reads) == 1
    assert [b["label"].tolist() for b in again] == [b["label"].tolist() for b in first] == [[1] * 4, [2] * 4]
    assert cache.bytes == 2 * (4 * 8 * 8 + 4 * 8)


def test_a_split_over_the_budget_or_not_kept_by_every_rank_is_read_each_time():
    small = 4 * 8 * 8 + 4 * 8  # one batch
    cache, reads = EvalBatches(agree=lambda kept: kept, max_bytes=small), []
    for _ in range(2):
        assert len(list(cache("val", _reader([_batch(1), _batch(2)], reads)))) == 2
    assert len(reads) == 2 and cache.bytes == 0
    list(cache("test", _reader([_batch(3)], reads)))  # what fits is still kept
    list(cache("test", _reader([_batch(3)], reads)))
    assert len(reads) == 3

    votes: list[bool] = []
    other_rank_full = EvalBatches(agree=lambda kept: votes.append(kept) or False)
    for _ in range(2):
        list(other_rank_full("val", _reader([_batch(1)], reads)))
    assert votes == [True, True] and len(reads) == 5  # this rank kept its share; another did not
