"""A run checks its own result, as a careful user would, and says in words what looks wrong.

Three checks on the finished run's summary, each with its threshold:
  - no better than a constant predictor: the test metric is within NO_BETTER_MARGIN (absolute,
    for metrics where higher is better: accuracy, F1, mAP, R^2) or NO_BETTER_RATIO (rmse/mae:
    at least 0.95x the constant's error) of what the best input-ignoring predictor scores on
    the same test rows (the most common class, every label, the mean target);
  - no better than its own baseline (the pretrained model with its new, untrained head), by
    the same margins;
  - val trails train-eval (the same weights on a fixed sample of training rows, in eval mode)
    by more than TRAIN_VAL_GAP (absolute) or, for errors, val above TRAIN_VAL_RATIO x train-eval:
    the model overfits, or training and evaluation see different inputs (BatchNorm statistics
    that do not match the weights were one such cause).
The metric is the checkpoint metric's (its task's first metric when that is the loss).
"""

from __future__ import annotations

from finetune.config import lower_is_better, task_class

NO_BETTER_MARGIN = 0.02
NO_BETTER_RATIO = 0.95
TRAIN_VAL_GAP = 0.10
TRAIN_VAL_RATIO = 1.5


def _no_better(score: float, reference: float, lower: bool) -> bool:
    return score >= reference * NO_BETTER_RATIO if lower else score <= reference + NO_BETTER_MARGIN


def check(summary: dict, checkpoint_metric: str) -> list[str]:
    """Warnings, each a sentence that names the numbers and what to try; [] for a sound result."""
    task = summary["task"]
    name = checkpoint_metric.split("/", 1)[1]
    if name == "loss":
        name = task_class(task).metric_names[0]
    lower = lower_is_better(name)
    warnings = []
    score = summary.get(f"test_{name}")
    constant = summary.get(f"constant_test_{name}")
    baseline = summary.get(f"baseline_test_{name}")
    if score is not None and constant is not None and _no_better(score, constant, lower):
        warnings.append(
            f"test {name} {score:.4f} is no better than {task_class(task).constant_predictor} ({constant:.4f}): the model learned nothing "
            "usable. Check that the labels belong to the inputs (data.label_column), then try a higher optim.lr, "
            "more train.epochs or strategy.name=full."
        )
    elif score is not None and baseline is not None and _no_better(score, baseline, lower):
        warnings.append(
            f"test {name} {score:.4f} is no better than the pretrained model with its new head only ({baseline:.4f}): "
            "fine-tuning did not help. Try a higher optim.lr, more train.epochs or another strategy."
        )
    scores = summary.get("best_epoch_scores") or {}
    val, train_eval = scores.get(f"val/{name}"), scores.get(f"train_eval/{name}")
    if val is not None and train_eval is not None:
        gap = val > train_eval * TRAIN_VAL_RATIO if lower else train_eval - val > TRAIN_VAL_GAP
        if gap:
            warnings.append(
                f"val {name} {val:.4f} trails the same model on training rows (train-eval {name} {train_eval:.4f}): "
                "it overfits, or training and evaluation see different inputs. Try more data or data.augment, "
                "fewer train.epochs or train.early_stopping, a lower optim.lr, or a strategy that trains less "
                "(partial, l2sp); check that val comes from the same source as train."
            )
    return warnings
