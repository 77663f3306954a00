"""MiniLM-L6's whole CPU training step with AdamW's per-tensor loop, its foreach and its fused
kernel: why `finetune` fuses on the CPU too (as transformers.Trainer does by default).

One process, every core, batch 64 of Rotten Tomatoes snippets (64 tokens, dynamic padding),
bf16 autocast, gradient clipping at 1.0; `--steps` steps per variant, the first 2 excluded.

    .venv/bin/python bench/fused_optimizer.py                 # single, fused, foreach, single, fused

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from finetune import models
from finetune.config import DataConfig, ModelConfig
from finetune.data.catalog import rotten_tomatoes_rows
from finetune.data.preprocess import trim_padding

VARIANTS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default="single,fused,foreach,single,fused", help="alternating, in this order")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    texts, categories = rotten_tomatoes_rows()
    model_cfg = ModelConfig(name="minilm-l6")
    preprocessor = models.build_preprocessor(model_cfg, DataConfig(source="rotten_tomatoes", max_length=64))
    batches = []
    for start in range(0, args.steps * args.batch_size, args.batch_size):
        chunk = slice(start, start + args.batch_size)
        encoded = preprocessor({"text": np.array(texts[chunk], dtype=object),
                                "label": np.array([c == "fresh" for c in categories[chunk]], dtype=np.int64)})  # fmt: skip
        batches.append(trim_padding({k: torch.from_numpy(v) for k, v in encoded.items()}))

    results: dict[str, list[dict]] = {}
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = models.build_model(model_cfg, num_labels=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **VARIANTS[variant])
        steps, updates = [], []
        for batch in batches:
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            torch.nn.functional.cross_entropy(logits.float(), batch["label"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            update_started = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ended = time.perf_counter()
            steps.append(ended - started)
            updates.append(ended - update_started)
        step_s, update_s = statistics.mean(steps[2:]), statistics.mean(updates[2:])
        results.setdefault(variant, []).append({"step_s": round(step_s, 3), "optimizer_step_s": round(update_s, 4),
                                                "samples_per_s": round(args.batch_size / step_s, 1)})  # fmt: skip
        print(f"{variant}: step {step_s:.3f} s, optimizer {update_s:.4f} s, {args.batch_size / step_s:.1f} samples/s", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "batch_size": args.batch_size, "results": results}))


if __name__ == "__main__":
    main()
