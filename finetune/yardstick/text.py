"""The text yardstick: TF-IDF of word 1-2-grams and character 2-5-grams (scikit-learn), and a
linear model per task: logistic regression (classification), one per label (multi_label), ridge
(regression). Its strength is chosen on the validation split by the run's metric, the way a
careful practitioner fits the cheapest model that could work.

Fitted, it is a linear head on TF-IDF features: outputs = features @ weight.T + bias, in the
task's head's terms (class logits, per-label logits, the value), so the task's own metrics score
it and its `predict` words it. Saved as plain arrays (each n-gram kind's terms and idf, the
weight and bias) in an .npz read without pickle, and its settings in JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import FeatureUnion

from finetune import files
from finetune.config import lower_is_better
from finetune.tasks import Task

DESCRIPTION = "TF-IDF (word 1-2-grams, character 2-5-grams) + {model}"
MODELS = {"classification": "logistic regression", "multi_label": "a logistic regression per label",
          "regression": "ridge regression"}  # fmt: skip
MAX_FEATURES = 200_000  # per n-gram kind: the most frequent, so memory stays bounded on large corpora
# what transform needs to rebuild each vectorizer around its saved terms and idf
VECTORIZERS = {
    "words": {"analyzer": "word", "ngram_range": [1, 2], "sublinear_tf": True},
    "chars": {"analyzer": "char_wb", "ngram_range": [2, 5], "sublinear_tf": True},
}
STRENGTHS = (0.5, 2.0, 8.0)  # logistic regression's C, ridge's 1/alpha: tried on val, the best kept
LOGIT_FLOOR = -16.0  # a class (or label) the training split never has: its logit, about 1e-7 probability


class TextYardstick:
    """TF-IDF features and a linear map; `model(texts=[...])` gives outputs shaped as the task's head's."""

    def __init__(self, features: FeatureUnion, weight: np.ndarray, bias: np.ndarray, task: Task) -> None:
        self.features, self.weight, self.bias, self.task = features, weight, bias, task

    @property
    def description(self) -> str:
        return DESCRIPTION.format(model=MODELS[self.task.type])

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return _linear(self.features.transform([str(t) for t in texts]), self.weight, self.bias)

    def save(self, folder: Path) -> None:
        """folder/text.npz (terms, idf, weight, bias; no pickled objects) and folder/text.json."""
        arrays = {"weight": self.weight, "bias": self.bias}
        for name, vectorizer in self.features.transformer_list:
            terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
            arrays[f"{name}_terms"], arrays[f"{name}_idf"] = np.array(terms, dtype=str), vectorizer.idf_
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        files.write_bytes(folder / "text.npz", buffer.getvalue())
        files.write_text(folder / "text.json", json.dumps({"vectorizers": VECTORIZERS}, indent=2))

    @classmethod
    def load(cls, folder: Path, task: Task) -> "TextYardstick":
        settings = json.loads((folder / "text.json").read_text())["vectorizers"]
        with np.load(folder / "text.npz", allow_pickle=False) as arrays:
            parts = []
            for name, params in settings.items():
                vectorizer = TfidfVectorizer(**{**params, "ngram_range": tuple(params["ngram_range"])},
                                             vocabulary=arrays[f"{name}_terms"].tolist(), dtype=np.float32)  # fmt: skip
                vectorizer.idf_ = arrays[f"{name}_idf"]  # sets up the fitted transformer around the given terms
                parts.append((name, vectorizer))
            return cls(FeatureUnion(parts), arrays["weight"], arrays["bias"], task)


def _linear(features, weight: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features @ weight.T) + bias, dtype=torch.float32)


def _features(rows: int) -> FeatureUnion:
    min_df = 2 if rows >= 1000 else 1  # an n-gram seen once in a large corpus is noise; in a small one, signal
    return FeatureUnion([
        (name, TfidfVectorizer(**{**params, "ngram_range": tuple(params["ngram_range"])}, min_df=min_df,
                               max_features=MAX_FEATURES, dtype=np.float32))
        for name, params in VECTORIZERS.items()
    ])  # fmt: skip


def _fit_linear(task: Task, features, labels: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of the task's linear model at this strength, as the task's head would hold them."""
    width = features.shape[1]
    if task.type == "regression":
        ridge = Ridge(alpha=1.0 / strength).fit(features, labels.astype(np.float64))
        return ridge.coef_.reshape(1, width).astype(np.float32), np.array([ridge.intercept_], dtype=np.float32)
    weight = np.zeros((task.num_outputs, width), dtype=np.float32)
    bias = np.full(task.num_outputs, LOGIT_FLOOR, dtype=np.float32)
    if task.type == "multi_label":  # one logistic regression per label; a label always (or never) on is constant
        for label, column in enumerate(labels.astype(np.int64).T):
            if column.min() == column.max():
                bias[label] = -LOGIT_FLOOR if column[0] else LOGIT_FLOOR
                continue
            model = LogisticRegression(C=strength, max_iter=2000).fit(features, column)
            weight[label], bias[label] = model.coef_[0], model.intercept_[0]
        return weight, bias
    targets = labels.astype(np.int64)
    classes = np.unique(targets)
    if len(classes) == 1:
        bias[classes[0]] = 0.0
        return weight, bias
    model = LogisticRegression(C=strength, max_iter=2000).fit(features, targets)
    if len(classes) == 2:  # one decision score: p(second class) = sigmoid(score) = softmax([0, score])
        weight[classes[1]], bias[classes[1]] = model.coef_[0], model.intercept_[0]
        bias[classes[0]] = 0.0
    else:  # multinomial: softmax over the classes' scores is predict_proba
        weight[classes], bias[classes] = model.coef_, model.intercept_
    return weight, bias


def score(task: Task, outputs: torch.Tensor, labels: np.ndarray, prefix: str) -> tuple[dict[str, float], dict]:
    """The task's metrics of these outputs (`{prefix}/<metric>`) and the per-row results."""
    targets = torch.as_tensor(labels, dtype=torch.long if task.type == "classification" else torch.float32)
    rows = task.eval_rows(outputs, targets)
    return task.metrics(rows, prefix), rows


def fit(task: Task, texts: list[str], labels: np.ndarray, val_texts: list[str], val_labels: np.ndarray,
        metric: str) -> tuple[TextYardstick, str]:  # fmt: skip
    """The yardstick fitted on the training texts, its strength chosen on val by `metric` (a name
    the task reports, e.g. accuracy); returns it with the setting kept, in words ("C=2")."""
    features = _features(len(texts))
    train_features = features.fit_transform([str(t) for t in texts])
    val_features = features.transform([str(t) for t in val_texts]) if len(val_texts) else None
    best = None
    for strength in STRENGTHS if val_features is not None else STRENGTHS[1:2]:
        weight, bias = _fit_linear(task, train_features, labels, strength)
        value = 0.0
        if val_features is not None:
            value = score(task, _linear(val_features, weight, bias), val_labels, "val")[0][f"val/{metric}"]
        key = -value if lower_is_better(metric) else value
        if best is None or key > best[0]:
            best = (key, strength, weight, bias)
    _, strength, weight, bias = best
    setting = f"alpha={1 / strength:g}" if task.type == "regression" else f"C={strength:g}"
    return TextYardstick(features, weight, bias, task), setting
