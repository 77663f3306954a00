"""The report's figures, drawn with matplotlib (and scikit-learn's displays where it has one) as
PNG bytes for inlining. Each is for a person: labelled axes, a title that says what it shows."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np

DPI = 110


@contextmanager
def _figure(*subplots: int, size: tuple[float, float] = (7.0, 4.2)):
    """A figure with `subplots` (rows, columns) whose PNG bytes land in the yielded dict's "png"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(*(subplots or (1, 1)), figsize=size, squeeze=False)
    out: dict = {}
    try:
        yield figure, axes.ravel(), out
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
        out["png"] = buffer.getvalue()
    finally:
        plt.close(figure)


def learning_curves(epochs: list[dict], metric: str, best_epoch: int | None) -> bytes:
    """Loss (train, train-eval, val) and the checkpoint metric (train-eval, val) per epoch."""
    name = metric.split("/", 1)[-1]
    x = [e["epoch"] + 1 for e in epochs]
    colours = {"train": "tab:blue", "train_eval": "tab:orange", "val": "tab:green"}  # the same in both panels
    panels = [("loss", [("train/loss", "train (with augmentation, while training)"),
                        ("train_eval/loss", "train-eval (fixed training rows, eval mode)"), ("val/loss", "val")]),
              (name, [(f"train_eval/{name}", "train-eval"), (f"val/{name}", "val")])]  # fmt: skip
    with _figure(1, 2, size=(10, 3.8)) as (figure, axes, out):
        for axis, (ylabel, series) in zip(axes, panels):
            for key, label in series:
                values = [e.get(key) for e in epochs]
                if any(v is not None for v in values):
                    axis.plot(x, [np.nan if v is None else v for v in values], marker="o", markersize=3, label=label,
                              color=colours[key.split("/")[0]])  # fmt: skip
            if best_epoch is not None:
                axis.axvline(best_epoch + 1, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch + 1})")
            axis.set_xlabel("epoch")
            axis.set_ylabel(ylabel)
            axis.set_title(f"{ylabel} per epoch")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
            if len(x) <= 20:
                axis.set_xticks(x)
    return out["png"]


def confusion_matrix(target: np.ndarray, prediction: np.ndarray, labels: list[str]) -> bytes:
    """Rows: the true class; each row normalised to 1 (its recall on the diagonal), counts printed."""
    from sklearn.metrics import ConfusionMatrixDisplay

    side = min(3.5 + 0.45 * len(labels), 14)
    with _figure(size=(side + 1.2, side)) as (figure, (axis,), out):
        ConfusionMatrixDisplay.from_predictions(
            target, prediction, labels=list(range(len(labels))), display_labels=labels, normalize="true",
            values_format=".2f", include_values=len(labels) <= 20, cmap="Blues", ax=axis, colorbar=True,
            xticks_rotation=45 if max(map(len, labels), default=0) > 4 else "horizontal",
        )  # fmt: skip
        axis.set_title(f"confusion matrix on test ({len(target)} rows; each true class's row sums to 1)")
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
    return out["png"]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE over equal-width confidence bins (the rows' share in each bin times |accuracy - confidence|),
    and each non-empty bin's rows, mean confidence and accuracy."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean_confidence, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += inside.mean() * abs(accuracy - mean_confidence)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "rows": int(inside.sum()),
                      "confidence": mean_confidence, "accuracy": accuracy})  # fmt: skip
    return float(ece), table


def reliability_diagram(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[bytes, float]:
    """Accuracy against confidence per bin, beside the diagonal of a perfectly calibrated model, and
    how many rows each bin holds; with the ECE."""
    ece, table = expected_calibration_error(confidence, correct, bins)
    width = 1.0 / bins
    with _figure(1, 2, size=(10, 3.8)) as (figure, (left, right), out):
        centres = [(row["low"] + row["high"]) / 2 for row in table]
        left.bar(centres, [row["accuracy"] for row in table], width=width * 0.9, edgecolor="black", label="accuracy")
        left.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        left.plot(centres, [row["confidence"] for row in table], "o", color="tab:red", markersize=4,
                  label="mean confidence in the bin")  # fmt: skip
        left.set_xlim(0, 1)
        left.set_ylim(0, 1)
        left.set_xlabel("confidence (the predicted class's probability)")
        left.set_ylabel("accuracy")
        left.set_title(f"reliability on test: ECE {ece:.3f}")
        left.legend(fontsize=7, loc="upper left")
        left.grid(alpha=0.3)
        right.bar(centres, [row["rows"] for row in table], width=width * 0.9, color="tab:grey", edgecolor="black")
        right.set_xlim(0, 1)
        right.set_xlabel("confidence")
        right.set_ylabel("test rows")
        right.set_title("rows per confidence bin")
        right.grid(alpha=0.3)
    return out["png"], ece


def regression_errors(target: np.ndarray, prediction: np.ndarray, target_name: str) -> bytes:
    """Predicted against true values, and the residuals against the prediction (scikit-learn's displays)."""
    from sklearn.metrics import PredictionErrorDisplay

    with _figure(1, 2, size=(10, 4.2)) as (figure, (left, right), out):
        shown = dict(subsample=2000, random_state=0)
        PredictionErrorDisplay.from_predictions(target, prediction, kind="actual_vs_predicted", ax=left, **shown)
        left.set_title(f"predicted vs true {target_name} on test")
        left.set_xlabel(f"predicted {target_name}")
        left.set_ylabel(f"true {target_name}")
        PredictionErrorDisplay.from_predictions(target, prediction, kind="residual_vs_predicted", ax=right, **shown)
        right.set_title("residuals (true - predicted)")
        right.set_xlabel(f"predicted {target_name}")
        right.set_ylabel("residual")
    return out["png"]


def trial_curves(curves: dict[str, tuple[list[int], list[float]]], metric: str, planned: int, winner: str | None) -> bytes:
    """Each trial's metric per epoch; a cross where a trial ended before its planned epochs (ASHA
    stopped it, or it failed), the winner drawn thick."""
    with _figure(size=(8, 4.5)) as (figure, (axis,), out):
        for trial, (epochs, values) in curves.items():
            if not epochs:
                continue
            best = trial == winner
            (line,) = axis.plot(epochs, values, marker="o", markersize=3, linewidth=2.6 if best else 1.2,
                                label=f"{trial} (winner)" if best else trial, zorder=3 if best else 2)  # fmt: skip
            if epochs[-1] < planned:
                axis.plot(epochs[-1:], values[-1:], "x", color=line.get_color(), markersize=9, mew=2)
        from matplotlib.ticker import MaxNLocator

        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epochs done")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} per trial (x: ended before epoch {planned})")
        axis.grid(alpha=0.3)
        if len(curves) <= 20:
            axis.legend(fontsize=7, ncol=2)
    return out["png"]


def parallel_coordinates(rows: list[dict], keys: list[str], metric: str, lower_is_better: bool) -> bytes:
    """One line per trial across the searched keys (numbers on a log axis where they span a factor
    of 10 or more, choices in order; a key a trial did not use sits below its axis) and the metric,
    coloured by the metric, the best darkest."""
    import matplotlib

    axes_names = [*keys, metric]
    unused = -0.1  # where a key the trial's pipeline does not have (a strategy's own setting) sits
    positions, ticks = [], []
    for name in axes_names:
        values = [row.get(name) for row in rows]
        present = [v for v in values if v is not None and v == v]
        numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(present):
            low, high = min(numbers), max(numbers)
            log = low > 0 and high / low >= 10
            scale = np.log10 if log else (lambda v: v)
            a, b = scale(low), scale(high)
            place = (lambda v: (scale(v) - a) / (b - a)) if b != a else (lambda v: 0.5)
            shown = sorted(set(numbers))
            shown = shown if len(shown) <= 6 else [low, high]
            labels = [f"{v:.3g}" for v in shown]
        else:
            choices = list(dict.fromkeys(str(v) for v in present))
            step = 1.0 / max(len(choices) - 1, 1)
            place = (lambda v, choices=choices, step=step: choices.index(str(v)) * step) if len(choices) > 1 else (lambda v: 0.5)
            shown, labels = choices, choices
        positions.append([unused if v is None or v != v else float(place(v)) for v in values])
        at = [float(place(v)) for v in shown]
        if len(present) < len(values):
            at, labels = [*at, unused], [*labels, "(not used)"]
        ticks.append((at, labels))
    scores = np.array([np.nan if row.get(metric) is None else row[metric] for row in rows], dtype=float)
    finite = scores[np.isfinite(scores)]
    norm = matplotlib.colors.Normalize(finite.min() if len(finite) else 0, finite.max() if len(finite) else 1)
    colormap = matplotlib.colormaps["viridis" if lower_is_better else "viridis_r"]  # the best dark on white
    with _figure(size=(max(6, 2.2 * len(axes_names)), 4.8)) as (figure, (axis,), out):
        order = np.argsort(np.nan_to_num(-scores if lower_is_better else scores, nan=-np.inf))  # the best drawn last
        for i in order:
            colour = colormap(norm(scores[i])) if np.isfinite(scores[i]) else "lightgrey"
            axis.plot(range(len(axes_names)), [column[i] for column in positions], color=colour, linewidth=1.8,
                      alpha=0.9, marker="o", markersize=3)  # fmt: skip
        for x, (at, labels) in enumerate(ticks):
            axis.axvline(x, color="black", linewidth=0.8)
            for y, label in zip(at, labels):
                axis.text(x + 0.03, y, label, fontsize=7, va="center")
        axis.set_xticks(range(len(axes_names)), [name.replace(".", ".\n") for name in axes_names], fontsize=8)
        axis.set_yticks([])
        axis.set_ylim(unused - 0.08, 1.08)
        axis.set_title(f"searched values against {metric} (the best trial darkest)")
        figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap), ax=axis, label=metric)
    return out["png"]


def epochs_per_trial(trials: list[str], epochs_run: list[int], planned: int, outcomes: list[str]) -> bytes:
    """Epochs each trial ran out of those planned: where ASHA stopped it, or where it failed."""
    colours = {"finished": "tab:green", "stopped early": "tab:orange", "errored": "tab:red"}
    with _figure(size=(8, 0.9 + 0.32 * len(trials))) as (figure, (axis,), out):
        axis.barh(trials, [planned] * len(trials), color="whitesmoke", edgecolor="lightgrey")
        axis.barh(trials, epochs_run, color=[colours[o] for o in outcomes])
        for outcome, colour in colours.items():
            if outcome in outcomes:
                axis.barh([trials[0]], [0], color=colour, label=outcome)
        axis.invert_yaxis()
        axis.set_xlim(0, planned)
        axis.set_xlabel(f"epochs run (of {planned} planned)")
        axis.set_title("where each trial ended")
        axis.legend(fontsize=7, loc="lower right")
    return out["png"]
