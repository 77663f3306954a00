"""Use a finished run: evaluate its best model on a split, or predict single inputs.

Both work from the run directory alone (config.yaml + best/); predict needs no Ray.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import config as config_module
from finetune.data import DataError
from finetune.data.datasets import build_datasets
from finetune.data.rows import BadRows
from finetune.models import SavedModel, load_model
from finetune.training import steps


def load_run(run_dir: str | Path) -> tuple[config_module.PipelineConfig, SavedModel]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "best" / "model.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run directory (config.yaml and best/ expected)")
    return config_module.load_saved(run_dir / "config.yaml"), load_model(run_dir / "best")


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Metrics of the run's best model on `split`, rebuilt from the run's own data config and seed."""
    from finetune.ray_env import ensure_ray, quiet_ray_data

    cfg, saved = load_run(run_dir)
    ensure_ray()
    quiet_ray_data()
    datasets = build_datasets(cfg.data, saved.preprocessor, cfg.train.seed, label_names=saved.label_names,
                              task=saved.task.type)  # fmt: skip
    if datasets.label_names != saved.label_names:  # a builtin dataset's labels, which are fixed
        raise DataError(
            f"the data now has labels {datasets.label_names}, the model was trained on {saved.label_names}"
        )
    device = torch.device("cpu")
    batches = datasets.as_dict()[split].iter_torch_batches(batch_size=cfg.train.eval_batch_size)
    rows = steps.evaluate_rows(
        saved.model, batches, saved.task, device=device, precision=steps.resolve_precision(cfg.train.precision, device)
    )
    return saved.task.metrics(rows, split)


@torch.no_grad()
def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """For each text (text models) or image path (image models): the label and class probabilities
    (classification), the labels at or above their thresholds and every label's probability
    (multi_label), or the value (regression); and `text`, all of it in one line."""
    return predict_with(load_run(run_dir)[1], inputs)


@torch.no_grad()
def predict_with(saved: SavedModel, inputs: list[str]) -> list[dict]:
    """`predict` with a model already loaded (`load_run`)."""
    if saved.preprocessor.kind == "image":
        missing = [p for p in inputs if not Path(p).is_file()]
        if missing:
            raise DataError(f"image file(s) not found: {', '.join(missing)}")
        try:
            encoded = saved.preprocessor.encode([Path(p).read_bytes() for p in inputs])
        except BadRows as bad:
            raise DataError("; ".join(f"{inputs[i]}: {reason}" for i, reason in bad.rows.items())) from None
    else:
        encoded = saved.preprocessor.encode(inputs)
    predictions = saved.task.predict(saved.model(**encoded))
    # text: the prediction as `finetune predict` prints it, the task's own words
    return [{"input": item, **prediction, "text": saved.task.prediction_text(prediction)}
            for item, prediction in zip(inputs, predictions)]  # fmt: skip
