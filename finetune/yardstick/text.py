"""The text yardstick: TF-IDF of word 1-2-grams and character 2-5-grams (scikit-learn), and a
linear model per task (yardstick/linear.py), the way a careful practitioner fits the cheapest
model that could work.

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
from sklearn.pipeline import FeatureUnion

from finetune import files
from finetune.tasks import Task
from finetune.yardstick.linear import MODELS, fit_linear, linear_outputs

DESCRIPTION = "TF-IDF (word 1-2-grams, character 2-5-grams) + {model}"
MAX_FEATURES = 200_000  # per n-gram kind: the most frequent, so memory stays bounded on large corpora
# what transform needs to rebuild each vectorizer around its saved terms and idf
VECTORIZERS = {
    "words": {"analyzer": "word", "ngram_range": [1, 2], "sublinear_tf": True},
    "chars": {"analyzer": "char_wb", "ngram_range": [2, 5], "sublinear_tf": True},
}


class TextYardstick:
    """TF-IDF features and a linear map; `model(texts=[...])` gives outputs shaped as the task's head's."""

    def __init__(self, features: FeatureUnion, weight: np.ndarray, bias: np.ndarray, task: Task) -> None:
        self.features, self.weight, self.bias, self.task = features, weight, bias, task

    @property
    def description(self) -> str:
        return DESCRIPTION.format(model=MODELS[self.task.type])

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return linear_outputs(self.features.transform([str(t) for t in texts]), self.weight, self.bias)

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
                vectorizer = _vectorizer(params, vocabulary=arrays[f"{name}_terms"].tolist())
                vectorizer.idf_ = arrays[f"{name}_idf"]  # sets up the fitted transformer around the given terms
                parts.append((name, vectorizer))
            return cls(FeatureUnion(parts), arrays["weight"], arrays["bias"], task)


def _vectorizer(params: dict, **fitting) -> TfidfVectorizer:
    """One n-gram kind's vectorizer from its saved settings (JSON has lists, scikit-learn wants a tuple)."""
    return TfidfVectorizer(**{**params, "ngram_range": tuple(params["ngram_range"])}, dtype=np.float32, **fitting)


def _features(rows: int) -> FeatureUnion:
    min_df = 2 if rows >= 1000 else 1  # an n-gram seen once in a large corpus is noise; in a small one, signal
    return FeatureUnion([(name, _vectorizer(params, min_df=min_df, max_features=MAX_FEATURES))
                         for name, params in VECTORIZERS.items()])  # fmt: skip


def fit(task: Task, texts: list[str], labels: np.ndarray, val_texts: list[str], val_labels: np.ndarray,
        metric: str) -> tuple[TextYardstick, str]:  # fmt: skip
    """The yardstick fitted on the training texts, its strength chosen on val by `metric` (a name
    the task reports, e.g. accuracy); returns it with the setting kept, in words ("C=2")."""
    features = _features(len(texts))
    train_features = features.fit_transform([str(t) for t in texts])
    val_features = features.transform([str(t) for t in val_texts]) if len(val_texts) else None
    weight, bias, setting = fit_linear(task, train_features, labels, val_features, val_labels, metric)
    return TextYardstick(features, weight, bias, task), setting
