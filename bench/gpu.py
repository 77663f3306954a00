"""The GPU path, without Ray: the project's step code (`finetune.training.steps.train_epoch`,
the same function a Ray Train worker calls) on one CUDA device, fp32 vs bf16 autocast, bare
and wrapped in DistributedDataParallel over nccl; samples/s, achieved TFLOP/s and model FLOPs
utilisation (MFU) for MiniLM-L6 (text) and EfficientNet-Lite0 (images).

The GPU machines lent to this project have torch and transformers but neither Ray nor a hub,
so the models come from packaged files: EfficientNet-Lite0 with its ImageNet weights,
MiniLM-L6 from its config.json with random weights (the values of the weights do not change
what a step costs). Batches are synthetic and already on the device: this measures the
training step, not the input pipeline (bench/data.py measures that).

FLOPs per step = 3 x the forward pass's FLOPs counted by torch.utils.flop_counter (matmuls,
attention, convolutions; backward costs twice the forward, the usual MFU convention; torch's
own backward count ignores groups and counts a depthwise convolution's weight gradient as a
dense one, 40x too high for EfficientNet); MFU = FLOPs per step x steps/s / the GPU's dense
bf16 tensor-core peak (fp32 runs are reported against the same peak, so the rows compare).
DDP runs in one process (world size 1: a single GPU cannot hold two nccl ranks), so its
figure is the cost DDP's bucketing and nccl all-reduce add to the same step. A `plain` row
runs the step without the GPU defaults of `finetune.training.steps` (channels-last convolutions,
fused optimizer, the loss read only when reported), to show what each default buys.

    python bench/gpu.py                                   # both models, fp32/bf16, bare/DDP
    python bench/gpu.py --models minilm-l6 --text-batch-size 128 --steps 100
    python bench/gpu.py --device cpu --steps 3 --warmup-steps 1     # the code path, on a CPU
    python bench/gpu.py --no-ddp --no-plain --strategies lora bitfit linear_probe   # what trains

The last line printed is one JSON object: {"device": ..., "runs": [one row per model, precision, ddp]}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch

from finetune import models
from finetune.config import ModelConfig, parse
from finetune.training import steps
from finetune.training.setup import build_training
from finetune.tasks.classification import Classification

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s; the first
# name fragment that occurs in torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM (HBM3)
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}
NUM_LABELS = 10


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS.items() if fragment in name), None)


def build(name: str, args) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    """The model, one batch of inputs (with `label`) on the CPU, and the batch size."""
    generator = torch.Generator().manual_seed(0)
    if name == "minilm-l6":
        config_source = args.minilm_config or models.resolve("minilm-l6").target
        model = models.build_architecture("hf", config_source, NUM_LABELS)
        size = args.text_batch_size
        vocab = model.hf_model.config.vocab_size
        batch = {
            "input_ids": torch.randint(1000, vocab, (size, args.seq_len), generator=generator),
            "attention_mask": torch.ones(size, args.seq_len, dtype=torch.long),
        }
    else:
        model = models.build_model(ModelConfig(name=name), NUM_LABELS, image_size=args.image_size)
        size = args.image_batch_size
        batch = {"pixel_values": torch.randn(size, 3, args.image_size, args.image_size, generator=generator)}
    batch["label"] = torch.randint(0, NUM_LABELS, (size,), generator=generator)
    return model, batch, size


def flops_per_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    inputs, _ = steps.split_batch(batch, device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    return 3 * counter.get_total_flops()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, precision: str, ddp_on: bool, plain: bool, device: torch.device, args, strategy: str = "full") -> dict:
    """`plain`: the step as it was before bench/gpu.py looked at it (NCHW weights, one optimizer
    kernel per tensor, the loss read off the GPU every step) against the project's defaults.
    `strategy`: what trains, as `finetune train` sets it up (adapters, frozen groups, lrs)."""
    torch.manual_seed(0)
    model, batch, batch_size = build(name, args)
    if plain:
        model = model.to(device)
    total_steps = args.warmup_steps + args.steps
    cfg = parse({"data": {"source": "x"}, "model": {"name": "x"}, "strategy": {"name": strategy},
                 "optim": {"lr": 1e-4}, "schedule": {"name": "linear", "warmup_ratio": 0.1}, "train": {"epochs": 1}})  # fmt: skip

    def wrap_ddp(module, param_groups, freezes):
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=freezes
        )  # fmt: skip

    # the run's own setup chain; `plain` keeps NCHW weights and one optimizer kernel per tensor
    training = build_training(cfg, model, total_steps, device=None if plain else device, wrap=wrap_ddp if ddp_on else None,
                              fused=False if plain else None)  # fmt: skip
    flops = flops_per_step(training.module, batch, device)
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    on_device = {k: v.to(device) for k, v in batch.items()}
    losses: list[float] = []

    def run(count: int) -> steps.EpochStats:
        return steps.train_epoch(
            model, (on_device for _ in range(count)), optimizer, scheduler, torch.nn.CrossEntropyLoss(),
            device=device, precision=precision, max_steps=count, max_grad_norm=1.0,
            on_step=lambda step, loss, stats: losses.append(loss), report_every=1 if plain else count,
        )  # fmt: skip

    run(args.warmup_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    stats = run(args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps_per_s = args.steps / (time.perf_counter() - started)
    # 3 x forward holds when every weight gets a gradient; a strategy that freezes most of the
    # model skips most weight gradients, so its rows carry no TFLOP/s or MFU.
    peak = peak_tflops(device, args.peak_tflops) if strategy in ("full", "discriminative", "l2sp") else None
    achieved = flops * steps_per_s / 1e12 if peak or strategy == "full" else None
    row = {
        "model": name, "strategy": strategy, "precision": precision, "ddp": ddp_on, "step": "plain" if plain else "default",
        "trainable_params": sum(p.numel() for group in training.param_groups for p in group["params"]),
        "batch_size": batch_size, "samples_per_s": round(steps_per_s * batch_size, 1),
        "step_ms": round(1000 / steps_per_s, 2), "gflops_per_step": round(flops / 1e9, 1),
        "tflops": round(achieved, 2) if achieved else None, "mfu": round(achieved / peak, 4) if peak else None,
        "loss_first_last": [round(losses[0], 3), round(stats.loss, 3)],
    }  # fmt: skip
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    if ddp_on:  # evaluation rows travel as in a Ray worker: gathered from every rank
        task = Classification([str(i) for i in range(NUM_LABELS)])
        rows = steps.evaluate_rows(model, [on_device] * 2, task, device=device, precision=precision)
        gathered = steps.all_gather_rows(rows)
        world = torch.distributed.get_world_size()
        row["eval_rows_gathered"] = len(gathered["loss"]) == world * len(rows["loss"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "efficientnet-lite0"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50, help="measured steps, after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--text-batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--image-batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--minilm-config", help="folder with MiniLM-L6's config.json (default: the packaged model)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--no-ddp", dest="ddp", action="store_false", help="skip the DDP (nccl) rows")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain-step rows")
    parser.add_argument("--strategies", nargs="*", default=[], help="also rows for these strategies, e.g. lora bitfit")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if args.ddp:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    runs = []
    for name in args.models:
        for precision in args.precisions:
            variants = [(False, False)] + [(False, True)] * args.plain + [(True, False)] * args.ddp
            for ddp, plain in variants:
                row = measure(name, precision, ddp, plain, device, args)
                print(json.dumps(row), flush=True)
                runs.append(row)
            for strategy in args.strategies:  # the project's step, bare, with less to train
                row = measure(name, precision, False, False, device, args, strategy)
                print(json.dumps(row), flush=True)
                runs.append(row)
    if args.ddp:
        torch.distributed.destroy_process_group()
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak_tflops(device, args.peak_tflops), "torch": torch.__version__,
        "backend": ("nccl" if device.type == "cuda" else "gloo") if args.ddp else None,
        "seq_len": args.seq_len, "image_size": args.image_size, "runs": runs,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
