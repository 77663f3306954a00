"""Use a finished run: evaluate its best model on a split, or predict single inputs.

Both work from the run directory alone (config.yaml + best/); predict needs no Ray.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import config as config_module
from finetune.data import DataError, windows
from finetune.data.datasets import build_datasets
from finetune.data.rows import BadRows
from finetune.models import SavedModel, load_model
from finetune.training import steps


def load_run(run_dir: str | Path) -> tuple[config_module.PipelineConfig, SavedModel]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "best" / "model.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run directory (config.yaml and best/ expected)")
    return config_module.load_saved(run_dir / "config.yaml"), load_model(run_dir / "best")


def split_batches(cfg: config_module.PipelineConfig, saved: SavedModel, split: str, batch_size: int | None = None):
    """The rows of `split` as the model's input batches (with their labels), rebuilt from the run's
    own data config and seed: the rows the run itself tested on."""
    from finetune.ray_env import ensure_ray, quiet_ray_data

    ensure_ray()
    quiet_ray_data()
    datasets = build_datasets(cfg.data, saved.preprocessor, cfg.train.seed, label_names=saved.label_names,
                              task=saved.task.type)  # fmt: skip
    if datasets.label_names != saved.label_names:  # a builtin dataset's labels, which are fixed
        raise DataError(
            f"the data now has labels {datasets.label_names}, the model was trained on {saved.label_names}"
        )
    return datasets.as_dict()[split].iter_torch_batches(batch_size=batch_size or cfg.train.eval_batch_size)


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Metrics of the run's best model on `split`."""
    cfg, saved = load_run(run_dir)
    device = torch.device("cpu")
    rows = steps.evaluate_rows(saved.model, split_batches(cfg, saved, split), saved.task, device=device,
                               precision=steps.resolve_precision(cfg.train.precision, device))  # fmt: skip
    return saved.task.metrics(rows, split)


@torch.no_grad()
def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """For each text (text models) or image path (image models): the label and class probabilities
    (classification), the labels at or above their thresholds and every label's probability
    (multi_label), or the value (regression); and `text`, all of it in one line."""
    return predict_with(load_run(run_dir)[1], inputs)


@torch.no_grad()
def predict_with(saved: SavedModel, inputs: list) -> list[dict]:
    """`predict` with a model already loaded (`load_run`). An image model also takes an image's
    encoded bytes in place of its path (what `finetune serve` receives)."""
    if saved.preprocessor.kind == "image":
        missing = [p for p in inputs if not isinstance(p, bytes) and not Path(p).is_file()]
        if missing:
            raise DataError(f"image file(s) not found: {', '.join(missing)}")
        try:
            encoded = saved.preprocessor.encode([p if isinstance(p, bytes) else Path(p).read_bytes() for p in inputs])
        except BadRows as bad:
            raise DataError("; ".join(f"{_named(inputs[i])}: {reason}" for i, reason in bad.rows.items())) from None
    else:
        encoded = saved.preprocessor.encode(inputs)
    owners = encoded.pop(windows.TEXT_ID, None)  # data.long_text=windows: each window's input
    logits = saved.model(**encoded)
    if owners is not None:
        logits = windows.pool(logits, owners)[0]  # the owners are the inputs' positions: in their order
    predictions = saved.task.predict(logits)
    # text: the prediction as `finetune predict` prints it, the task's own words
    return [{"input": _named(item), **prediction, "text": saved.task.prediction_text(prediction)}
            for item, prediction in zip(inputs, predictions)]  # fmt: skip


def _named(item) -> str:
    return f"({len(item):,} bytes of image)" if isinstance(item, bytes) else item
