"""Hugging Face sequence classifiers behind one `forward(input_ids, attention_mask) -> logits`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _quiet_transformers() -> None:
    # Loading reports (missing head weights, expected here) would flood every worker's log.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class TextClassifier(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask).logits


def build_text_model(name_or_path: str, num_labels: int, trust_remote_code: bool = False) -> TextClassifier:
    """Pretrained encoder from the hub or a local folder; a fresh head for `num_labels` classes.
    `trust_remote_code`: model.trust_remote_code (off: a model that ships code is refused)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    hf_model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code
    )
    return TextClassifier(hf_model)


def save_text_model(model: TextClassifier, directory: Path, label_names: list[str], problem_type: str) -> None:
    """A Hugging Face model folder: `AutoModelForSequenceClassification.from_pretrained(directory)`
    and `pipeline("text-classification", model=directory)` load it with its label names."""
    config = model.hf_model.config
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.problem_type = problem_type
    model.hf_model.save_pretrained(directory)


def load_text_model(directory: str | Path, trust_remote_code: bool = False) -> TextClassifier:
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()  # which also hides the loading report: a weight it lacks is an error here instead
    hf_model, loading = AutoModelForSequenceClassification.from_pretrained(
        directory, trust_remote_code=trust_remote_code, output_loading_info=True
    )
    missing = [*loading.get("missing_keys", []), *loading.get("mismatched_keys", [])]
    if missing:
        raise ValueError(f"{directory}: the saved weights lack {len(missing)} of the model's, e.g. {missing[0]}")
    return TextClassifier(hf_model)


def rebuild_text_model(config_source: str | Path, num_labels: int, trust_remote_code: bool = False) -> TextClassifier:
    """The architecture from a config.json (a saved model folder or a hub id), without weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_transformers()
    config = AutoConfig.from_pretrained(config_source, num_labels=num_labels, trust_remote_code=trust_remote_code)
    return TextClassifier(AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code))
