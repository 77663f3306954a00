"""A run checks its own result, as a careful user would, and says in words what looks wrong.

Four checks on the finished run's summary, each with its threshold:
  - no better than a constant predictor: the test metric is within NO_BETTER_MARGIN (absolute,
    for metrics where higher is better: accuracy, F1, mAP, R^2) or NO_BETTER_RATIO (rmse/mae:
    at least 0.95x the constant's error) of what the best input-ignoring predictor scores on
    the same test rows (the most common class, every label, the mean target);
  - no better than its own baseline (the pretrained model with its new, untrained head), by
    the same margins;
  - val trails train-eval (the same weights on a fixed sample of training rows, in eval mode)
    by more than TRAIN_VAL_GAP (absolute) or, for errors, val above TRAIN_VAL_RATIO x train-eval:
    the model overfits, or training and evaluation see different inputs (BatchNorm statistics
    that do not match the weights were one such cause). Not said of a model that does no better
    than a constant on the training rows themselves (it has fit nothing to overfit with).
  - no better than the yardstick (the cheapest model that could work, fit on the same rows:
    finetune/yardstick): the fine-tuned model trails it, or leads by no more than the noise
    (twice the bootstrap standard error of the yardstick's test score); what to try is named,
    from what the run knows (texts cut at max_length, val still rising at the last epoch).
The metric is the checkpoint metric's (its task's first metric when that is the loss).
"""

from __future__ import annotations

from finetune.config import judged_metric, lower_is_better, task_class
from finetune.data import token_lengths

NO_BETTER_MARGIN = 0.02
NO_BETTER_RATIO = 0.95
TRAIN_VAL_GAP = 0.10
TRAIN_VAL_RATIO = 1.5


def _no_better(score: float, reference: float, lower: bool) -> bool:
    return score >= reference * NO_BETTER_RATIO if lower else score <= reference + NO_BETTER_MARGIN


def check(summary: dict, checkpoint_metric: str) -> list[str]:
    """Warnings, each a sentence that names the numbers and what to try; [] for a sound result."""
    task = summary["task"]
    name = judged_metric(task, checkpoint_metric)
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
    if score is not None and (against := _against_yardstick(summary, name, score, lower)):
        warnings.append(against)
    scores = summary.get("best_epoch_scores") or {}
    val, train_eval = scores.get(f"val/{name}"), scores.get(f"train_eval/{name}")
    train_constant = scores.get(f"constant_train_eval/{name}")
    # a model no better than a constant on its own training rows fits nothing: a gap to val is then
    # the splits' class balance (or target spread), not overfitting
    if val is not None and train_eval is not None:
        fits_training_rows = train_constant is None or not _no_better(train_eval, train_constant, lower)
        gap = val > train_eval * TRAIN_VAL_RATIO if lower else train_eval - val > TRAIN_VAL_GAP
        if gap and fits_training_rows:
            warnings.append(
                f"val {name} {val:.4f} trails the same model on training rows (train-eval {name} {train_eval:.4f}): "
                "it overfits, or training and evaluation see different inputs. Try more data or data.augment, "
                "fewer train.epochs or train.early_stopping, a lower optim.lr, or a strategy that trains less "
                "(partial, l2sp); check that val comes from the same source as train."
            )
    return warnings


def _against_yardstick(summary: dict, name: str, score: float, lower: bool) -> str | None:
    stick = summary.get(f"yardstick_test_{name}")
    if stick is None:
        return None
    about = summary["yardstick"]
    noise = about["noise"].get(name, 0.0)
    lead = stick - score if lower else score - stick  # how far fine-tuning is ahead
    if lead > noise:
        return None
    what = f"the yardstick ({about['description']}, fit in {about['seconds']:.0f} s)"
    run = summary.get("run_dir", "RUN_DIR")
    inputs = "IMAGE" if about.get("kind") == "image" else "TEXT"
    keep = f"keep the linear model: finetune predict {run} --model yardstick {inputs}..."
    if lead < -noise:
        said = f"{what} beats the fine-tuned model on test: {name} {stick:.4f} against {score:.4f}."
    elif score == (0.0 if lower else 1.0):  # both perfect: nothing to try, only a cheaper model to keep
        return f"{what} scores a perfect test {name} too, as the fine-tuned model does: it is enough for this data; {keep}"
    else:
        said = (f"the fine-tuned model's test {name} {score:.4f} is within the noise (+-{noise:.4f} on these test "
                f"rows) of {what}: {stick:.4f}.")  # fmt: skip
    tries = []
    lengths = summary.get("token_lengths")
    if lengths and "capped_share" in lengths:  # data.long_text=windows reads long texts whole, up to max_windows
        if lengths["capped_share"] >= token_lengths.WARN_CUT_SHARE:
            tries.append(f"a larger data.max_windows ({lengths['capped_share']:.0%} of the training texts need more "
                         f"than {lengths['max_windows']} windows)")  # fmt: skip
    elif lengths and lengths["cut_share"] >= token_lengths.WARN_CUT_SHARE:
        tries.append(f"a longer data.max_length or data.long_text=head_tail or windows ({lengths['cut_share']:.0%} of "
                     f"the training texts are cut at {lengths['max_length']} tokens; p90 {lengths['p90']})")  # fmt: skip
    if summary.get("best_epoch") is not None and summary["best_epoch"] == summary["epochs_run"] - 1 and not summary.get("early_stopped"):
        tries.append("more train.epochs (val was still improving at the last epoch)")
    tries.append("another strategy (strategy.name=auto races them)")
    return f"{said} Try {', '.join(tries)}; or {keep}"
