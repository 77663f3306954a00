"""How long the training texts are in the model's tokens, against `data.max_length`: a text longer
than that is cut, and the model never reads its end. Measured on a seeded sample of the training
split with the model's own tokenizer, on the driver (no Ray task: a few thousand texts take a
second or two)."""

from __future__ import annotations

import numpy as np

from finetune.config import PipelineConfig
from finetune.data import windows

SAMPLE_ROWS = 2000  # training texts tokenized: the share cut is known to about +-1 point
WARN_CUT_SHARE = 0.10  # from this share of texts cut, the run warns
PERCENTILES = (50, 90, 99)


def measure(cfg: PipelineConfig, label_names: list[str] | None = None) -> dict | None:
    """{"p50", "p90", "p99", "longest", "max_length", "cut_share", "texts", "of", "model_limit"}
    for a text pipeline (None for images). `label_names`: the run's (None: discovered)."""
    from finetune import models
    from finetune.data.local import local_splits
    from finetune.data.preprocess import load_tokenizer

    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    if preprocessor.kind != "text":
        return None
    kind, rows = local_splits(cfg.data, cfg.train.seed, label_names, cfg.task.type, {"train": SAMPLE_ROWS})
    texts = rows["train"].inputs
    if kind != "text" or not texts:
        return None
    tokenizer = load_tokenizer(preprocessor.tokenizer, preprocessor.trust_remote_code)
    lengths = np.array([len(ids) for ids in tokenizer([str(t) for t in texts], truncation=False, verbose=False)["input_ids"]])
    limit = tokenizer.model_max_length
    stats = {
        **{f"p{q}": int(np.percentile(lengths, q)) for q in PERCENTILES},
        "longest": int(lengths.max()), "max_length": cfg.data.max_length,
        "cut_share": float((lengths > cfg.data.max_length).mean()), "texts": len(texts), "of": rows["train"].total,
        "model_limit": int(limit) if limit < 1_000_000 else None,  # tokenizers without a limit say 1e30
    }  # fmt: skip
    if cfg.data.long_text == "windows":
        room = preprocessor.window_room(tokenizer)
        specials = cfg.data.max_length - room
        needed = np.array([windows.windows_of(int(n) - specials, room, preprocessor.stride(room)) for n in lengths])
        read = np.minimum(needed, cfg.data.max_windows)
        stats.update(windows_mean=float(read.mean()), max_windows=cfg.data.max_windows,
                     capped_share=float((needed > cfg.data.max_windows).mean()))  # fmt: skip
    return stats


def describe(stats: dict) -> str:
    """One line: the percentiles against max_length and the share cut."""
    sample = f"a sample of {stats['texts']:,} of {stats['of']:,}" if stats["texts"] < stats["of"] else f"all {stats['texts']:,}"
    line = (f"token lengths ({sample} training texts): p50 {stats['p50']}, p90 {stats['p90']}, p99 {stats['p99']}, "
            f"longest {stats['longest']}; ")  # fmt: skip
    if "windows_mean" in stats:
        return line + (f"{stats['cut_share']:.1%} are longer than data.max_length={stats['max_length']} and read as "
                       f"windows: {stats['windows_mean']:.2f} windows per text, {stats['capped_share']:.1%} of texts "
                       f"beyond data.max_windows={stats['max_windows']}")  # fmt: skip
    return line + f"data.max_length={stats['max_length']} cuts {stats['cut_share']:.1%} of them"


def warning(stats: dict, long_text: str = "truncate") -> str | None:
    """What to do when a large share of the texts is cut (None when few are)."""
    if long_text == "windows":
        if stats["capped_share"] < WARN_CUT_SHARE:
            return None
        return (f"{stats['capped_share']:.0%} of the training texts need more than data.max_windows="
                f"{stats['max_windows']} windows: the model reads that many spread over each, not all of it. To read "
                "more, raise data.max_windows or data.window_stride (less overlap), or data.max_length "
                "(fewer, longer windows).")  # fmt: skip
    if stats["cut_share"] < WARN_CUT_SHARE:
        return None
    room = stats["model_limit"] and stats["model_limit"] > stats["max_length"]
    tries = [f"raise data.max_length (the model reads up to {stats['model_limit']} tokens; p90 is {stats['p90']})"] if room else []
    if long_text == "truncate":
        tries.append("set data.long_text=head_tail to keep each text's end as well as its start, or windows to read "
                     "all of it")
    unread = "their end" if long_text == "truncate" else "their middle"
    return (f"{stats['cut_share']:.0%} of the training texts are longer than data.max_length={stats['max_length']} "
            f"tokens and are cut: the model never reads {unread}."
            + (f" To read more, {', or '.join(tries)}." if tries else ""))
