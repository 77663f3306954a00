"""Training losses from the pipeline's `loss` section, per task; plain PyTorch (no Ray).

Classification targets are class indices, or class probabilities when mixup/cutmix mixed the
batch (both losses take either); multi-label targets are 0/1 vectors; regression targets are
floats, which the loss standardises with the training split's mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import ConfigError, LossConfig


def class_weights(cfg: LossConfig, label_names: list[str], label_counts: dict[str, int] | None) -> torch.Tensor | None:
    """Per-class weights in label order: given, or 'balanced' = rows / (classes x rows of the
    class) on the training split (scikit-learn's definition), times focal's alpha."""
    weights = None
    if cfg.class_weights == "balanced":
        counts = torch.tensor([float((label_counts or {}).get(name, 0)) for name in label_names])
        if (counts == 0).any():
            missing = [name for name, n in zip(label_names, counts) if n == 0]
            raise ConfigError([f"loss.class_weights=balanced: no training rows of class {missing}"])
        weights = counts.sum() / (len(label_names) * counts)
    elif cfg.class_weights is not None:
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32)
    for key, values in (("loss.class_weights", cfg.class_weights), ("loss.alpha", cfg.alpha)):
        if isinstance(values, list) and len(values) != len(label_names):
            raise ConfigError([f"{key} has {len(values)} weights; the data has {len(label_names)} labels "
                               f"({', '.join(label_names)})"])  # fmt: skip
    if cfg.name == "focal" and cfg.alpha is not None:
        alpha = torch.tensor(cfg.alpha, dtype=torch.float32)
        weights = alpha if weights is None else weights * alpha
    return weights


class FocalLoss(nn.Module):
    """-sum_c w_c q_c (1 - p_c) ** gamma log p_c, q the (smoothed) target distribution; averaged
    like torch's cross-entropy (over the targets' weights for class indices, over rows for
    probabilities), so gamma=0 is exactly nn.CrossEntropyLoss with the same options."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        classes = logits.shape[-1]
        hard = not target.is_floating_point()
        q = F.one_hot(target, classes).to(log_p.dtype) if hard else target
        if self.label_smoothing:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        weight = self.weight if self.weight is not None else torch.ones(classes, device=logits.device)
        per_row = -(weight * q * (1.0 - log_p.exp()) ** self.gamma * log_p).sum(dim=-1)
        if hard:
            return per_row.sum() / weight[target].sum()
        return per_row.mean()


def build_loss(cfg: LossConfig, label_names: list[str], label_counts: dict[str, int] | None = None) -> nn.Module:
    """The classification training loss. (Validation and test loss are plain cross-entropy
    whatever this is, so val/loss compares across loss settings and needs no training-split counts.)"""
    weight = class_weights(cfg, label_names, label_counts)
    if cfg.name == "focal":
        return FocalLoss(cfg.gamma, weight, cfg.label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def positive_weights(cfg: LossConfig, label_names: list[str], positives: list[float] | None, rows: int) -> torch.Tensor | None:
    """multi_label: the weight of each label's positive rows (torch's pos_weight), given or
    'balanced' = negative rows / positive rows of the label on the training split."""
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "balanced":
        positives = torch.tensor(positives, dtype=torch.float32)
        if (positives == 0).any():
            missing = [name for name, n in zip(label_names, positives) if n == 0]
            raise ConfigError([f"loss.class_weights=balanced: no training row has label {missing}"])
        return (rows - positives) / positives
    if len(cfg.class_weights) != len(label_names):
        raise ConfigError([f"loss.class_weights has {len(cfg.class_weights)} weights; the data has "
                           f"{len(label_names)} labels ({', '.join(label_names)})"])  # fmt: skip
    return torch.tensor(cfg.class_weights, dtype=torch.float32)


class MultiLabelLoss(nn.Module):
    """A sigmoid per label: binary cross-entropy (positives weighted by pos_weight) or the sigmoid
    focal loss (torchvision's), averaged over rows and labels. Label smoothing moves each 0/1
    target `label_smoothing` of the way toward 1/2."""

    def __init__(self, cfg: LossConfig, pos_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.focal, self.gamma, self.label_smoothing = cfg.name == "focal", cfg.gamma, cfg.label_smoothing
        self.alpha = -1.0 if cfg.alpha is None else float(cfg.alpha)  # torchvision: negative = no weighting
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        if self.focal:
            from torchvision.ops import sigmoid_focal_loss

            return sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="mean")
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)


class RegressionLoss(nn.Module):
    """MSE or Huber between the single output and the standardised target (target - mean) / std."""

    def __init__(self, cfg: LossConfig, mean: float, std: float) -> None:
        super().__init__()
        self.huber, self.delta, self.mean, self.std = cfg.name == "huber", cfg.delta, mean, std

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction, standard = outputs.squeeze(-1), (target - self.mean) / self.std
        if self.huber:
            return F.huber_loss(prediction, standard, delta=self.delta)
        return F.mse_loss(prediction, standard)
