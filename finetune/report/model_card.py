"""best/README.md: the model card of a finished run or sweep, with the metadata block Hugging Face's
model cards carry (library_name, pipeline_tag, base_model, tags, metrics, model-index), so the
folder reads the same on the Hub as on disk. Built from the run directory alone (config.yaml,
summary.json, best/), like report.html."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune import config as config_module
from finetune import files
from finetune.data.catalog import CATALOG
from finetune.models import base_model

CARD = "README.md"
PIPELINE_TAGS = {"text": "text-classification", "image": "image-classification"}
TASK_NAMES = {"text-classification": "Text Classification", "image-classification": "Image Classification"}


def write_model_card(run_dir: str | Path, command: str | None = None) -> Path:
    """RUN_DIR/best/README.md. `command`: what reproduces the run (default: training its saved config)."""
    run_dir = Path(run_dir)
    best = run_dir / "best"
    files.write_text(best / CARD, model_card(run_dir, command))
    return best / CARD


def model_card(run_dir: Path, command: str | None = None) -> str:
    cfg = config_module.load_saved(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    best = run_dir / "best"
    preprocessing = json.loads((best / "preprocessing.json").read_text())
    labels = json.loads((best / "labels.json").read_text())
    kind = preprocessing["kind"]
    pipeline_tag = PIPELINE_TAGS[kind]
    base = base_model(cfg.model.name)
    source = data_source(cfg.data.source)
    summary = _as_run_summary(summary)
    tested = {key[len("test_"):]: value for key, value in summary.items()
              if key.startswith("test_") and key != "test_samples" and isinstance(value, float)}  # fmt: skip
    metadata = {
        **({"library_name": "transformers"} if kind == "text" else {}),
        "pipeline_tag": pipeline_tag,
        **({"base_model": base} if base and "/" in base and not Path(base).exists() else {}),
        "tags": ["finetune", f"strategy-{cfg.strategy.name}", cfg.task.type],
        "metrics": sorted(name for name in tested if name != "loss"),
        "model-index": [{"name": cfg.name, "results": [{
            "task": {"type": pipeline_tag, "name": TASK_NAMES[pipeline_tag]},
            "dataset": {"name": source, "type": source, "split": "test"},
            "metrics": [{"type": name, "value": round(value, 4), "name": f"test {name}"} for name, value in tested.items()
                        if name != "loss"],
        }]}],
    }  # fmt: skip
    strategy = cfg.strategy.model_dump(exclude={"name"})
    parts = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---",
        f"# {cfg.name}",
        f"A {cfg.task.type.replace('_', '-')} model fine-tuned from **{base}** with "
        f"finetune (strategy `{cfg.strategy.name}`), on {source}.",
        "## Labels\n\n" + _labels(cfg.task.type, labels, best),
        "## Training data\n\n" + _data(cfg, summary, source),
        "## Training procedure\n\n" + _procedure(cfg, summary, strategy),
        "## Evaluation\n\n" + _evaluation(summary, tested),
        "## How to use\n\n" + _usage(kind, cfg.task.type, preprocessing),
        "## Reproduce\n\n" + "```bash\n" + (command or "finetune train config.yaml") + "\n```\n\n"
        "`config.yaml` is the run's resolved pipeline, beside `best/` in the run directory; below with local "
        "paths cut to their file names.\n\n<details><summary>the resolved pipeline</summary>\n\n```yaml\n"
        + yaml.safe_dump(_without_local_paths(yaml.safe_load((run_dir / "config.yaml").read_text())), sort_keys=False)
        + "```\n\n</details>",
        "## Intended use and limits\n\n" + _limits(cfg, summary, source),
    ]
    return "\n\n".join(parts) + "\n"


def _without_local_paths(value):
    """`value` with every absolute local path (data files, a local model folder, weights) cut to its
    last part: the card names no folder of the training machine."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str):
        prefix, _, path = value.rpartition(":") if value.startswith(("hf:", "torchvision:")) else ("", "", value)
        if path.startswith(("/", "~")):
            return f"{prefix}:{Path(path).name}" if prefix else Path(path).name
    return value


def _as_run_summary(summary: dict) -> dict:
    """A sweep's summary.json in a run's terms: its best trial's test metrics and best epoch."""
    if "trials" not in summary:
        return summary
    best = summary.get("best") or {}
    tested = {key.replace("/", "_"): value for key, value in best.items() if key.startswith("test/")}
    return {**tested, "best_epoch": best.get("epoch"), "warnings": [],
            "sweep": f"the best of {summary['trials']} trials of a sweep"}


def data_source(source: str) -> str:
    """The data's name as the card shows it: a builtin dataset's name, or a file's name without the
    folders of the machine it was trained on."""
    return source if source in CATALOG else Path(source).name


def _labels(task: str, labels: list[str], best: Path) -> str:
    if task == "regression":
        return f"One output: `{labels[0]}`, in its own units."
    lines = [f"{len(labels)} labels: " + ", ".join(f"`{name}`" for name in labels[:50]) + (" ..." if len(labels) > 50 else "")]
    if task == "multi_label":
        thresholds = json.loads((best / "task.json").read_text()).get("thresholds")
        if thresholds:
            lines.append("A label applies when its probability is at or above its threshold (tuned on val): "
                         + ", ".join(f"`{n}` {t:.2f}" for n, t in zip(labels, thresholds)) + ".")  # fmt: skip
    return "\n\n".join(lines)


def _data(cfg, summary: dict, source: str) -> str:
    rows = [f"- source: {source}",
            *[f"- {what} rows: {int(summary[key]):,}" for what, key in (("training", "train_rows"), ("test", "test_samples"))
              if isinstance(summary.get(key), (int, float))]]  # fmt: skip
    if cfg.data.source in CATALOG:
        rows.append(f"- splits: the builtin dataset's official test set where it has one, else {cfg.data.test_fraction:.0%} "
                    f"held out; val {cfg.data.val_fraction:.0%} of the rest; seed {cfg.train.seed}")
    else:
        for split, given, fraction in (("val", cfg.data.val_source, cfg.data.val_fraction),
                                       ("test", cfg.data.test_source, cfg.data.test_fraction)):  # fmt: skip
            rows.append(f"- {split}: " + (data_source(given) if given else
                                           f"{fraction:.0%} of the source, split with seed {cfg.train.seed}"))  # fmt: skip
    skipped = summary.get("skipped_rows") or {}
    if skipped:
        rows.append("- rows skipped as unreadable: " + ", ".join(f"{n} in {split}" for split, n in skipped.items()))
    return "\n".join(rows)


def _procedure(cfg, summary: dict, strategy: dict) -> str:
    settings = ", ".join(f"{key}={value}" for key, value in strategy.items() if value not in (None, [], {})) or "defaults"
    rows = [
        f"- strategy: `{cfg.strategy.name}` ({settings})",
        f"- optimizer: {cfg.optim.name}, learning rate {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}; "
        f"schedule {cfg.schedule.name}",
        *([f"- chosen as {summary['sweep']}"] if "sweep" in summary else []),
        f"- epochs: {summary.get('epochs_run', cfg.train.epochs)} of {summary.get('epochs', cfg.train.epochs)}, best on val at epoch "
        f"{(summary.get('best_epoch') or 0) + 1} ({cfg.checkpoint.metric})",
        f"- batch size {cfg.train.batch_size} x {summary.get('num_workers', 1)} worker(s) x "
        f"{cfg.train.grad_accum_steps} accumulation step(s); precision {cfg.train.precision}; seed {cfg.train.seed}",
    ]
    return "\n".join(rows)


def _evaluation(summary: dict, tested: dict[str, float]) -> str:
    def cell(value) -> str:
        return "" if value is None else f"{value:.4f}"

    stick = summary.get("yardstick")
    lines = ["On the test split, never seen in training or model selection:", "",
             "| metric | fine-tuned | pretrained, new head only | constant predictor |" + (" yardstick |" if stick else ""),
             "|---|---|---|---|" + ("---|" if stick else "")]  # fmt: skip
    for name, value in tested.items():
        lines.append(f"| {name} | {cell(value)} | {cell(summary.get(f'baseline_test_{name}'))} | "
                     f"{cell(summary.get(f'constant_test_{name}'))} |"
                     + (f" {cell(summary.get(f'yardstick_test_{name}'))} |" if stick else ""))  # fmt: skip
    if stick:
        lines += ["", f"The yardstick: {stick['description']} ({stick['setting']}), fit on the same training rows."]
    return "\n".join(lines)


def _usage(kind: str, task: str, preprocessing: dict) -> str:
    if kind == "text":
        apply = {"multi_label": ', top_k=None  # every label\'s probability; apply the thresholds above',
                 "regression": ', function_to_apply="none"'}.get(task, "")  # fmt: skip
        long_text = preprocessing.get("long_text", "truncate")
        if long_text == "truncate":
            cut = f"Texts are cut at {preprocessing['max_length']} tokens, as in training.\n\n"
        elif long_text == "windows":
            cut = (f"Training read a long text as overlapping windows of {preprocessing['max_length']} tokens "
                   f"(each with the special tokens, {preprocessing['window_stride']} tokens apart, at most "
                   f"{preprocessing['max_windows']}: data.long_text=windows) and averaged the windows' logits per "
                   "text; transformers' pipeline reads only the first window, so split long texts the same way "
                   "and average the logits, or use finetune.\n\n")
        else:
            cut = (f"Training kept a long text's start and end within {preprocessing['max_length']} tokens "
                   f"({preprocessing['head_share']:.0%} from the start: data.long_text=head_tail); transformers' "
                   "truncation keeps only the start, so cut long texts the same way first, or use finetune.\n\n")
        return (
            "With transformers alone (this folder is a Hugging Face model folder):\n\n```python\n"
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("text-classification", model="path/to/best", truncation=True)\n'
            f'classifier(["your text"]{apply})\n```\n\n'
            + cut
            + "With finetune (prints what `finetune predict` prints):\n\n```bash\nfinetune predict RUN_DIR \"your text\"\n```"
        )
    mean = ", ".join(f"{v:g}" for v in preprocessing["mean"])
    std = ", ".join(f"{v:g}" for v in preprocessing["std"])
    return (
        f"Inputs: RGB images (turned upright by their EXIF orientation), resized to {preprocessing['size']}x"
        f"{preprocessing['size']} (bilinear, aspect ratio not kept, as in training), scaled to [0, 1], then normalised "
        f"per channel with mean ({mean}) and std ({std}); NCHW float32. Outputs: one logit per label, in the order "
        "above.\n\n"
        "```bash\nfinetune predict RUN_DIR photo.jpg\nfinetune export RUN_DIR --format onnx\n```"
    )


def _limits(cfg, summary: dict, source: str) -> str:
    lines = [f"Made for inputs like the rows of {source}, with the labels above. Its scores hold for data from the same "
             "source; measure it on your own data before relying on it elsewhere."]  # fmt: skip
    warnings = summary.get("warnings") or []
    if warnings:
        lines += ["", "What the run itself warned about:", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines)
