"""strategy.name: auto — choose the fine-tuning strategy on the user's own data, within a budget.

Not a strategy with hooks: the driver races candidate settings (a strategy section and a
learning rate each) and trains the winner (finetune/tuning/race.py). What this module decides,
without Ray:

- the candidates: for each strategy in `strategy.candidates`, its prior, a short list of
  (section, learning rate) settings ranked by what bench/strategies.py measured on text
  (MiniLM-L6, Rotten Tomatoes) and images (EfficientNet-Lite0, Fashion-MNIST) with 500 and
  2,000 rows; the first setting of each strategy first, further settings while the budget
  has room;
- the race (successive halving, eta = `reduction_factor`): every candidate trains to the first
  rung on the pipeline's own schedule, the best 1/eta continue from their checkpoints to the
  next rung, and the last one standing trains to train.epochs. Rungs are counted in epochs;
  the budget counts every candidate's epoch as one epoch of full fine-tuning (a linear probe's
  epoch costs less; evaluation and start-up come on top: bench/auto.py measured 2.3-2.7x for a budget of 3);
- the screen: a linear probe on the frozen features is the first candidate; a candidate that
  scores below it at a rung is not continued whatever its rank (it did worse than not training
  the body), so when nothing beats the probe the race ends early with the probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator

from finetune.config.base import Section

# Ranked settings per strategy and modality: (strategy section without its name, learning rate
# as a multiple of full fine-tuning's). Full fine-tuning's own rate is the pipeline's optim.lr
# when the file sets it, else FULL_LR's measured one. Sources: bench/strategies.py's table
# (docs/BENCHMARKS.md) and the validation-split selection runs in
# bench/results/strategy_selection.jsonl; lp_ft probes at linear_probe's rate.
FULL_LR = {"text": 1e-4, "image": 1e-3}
PRIORS: dict[str, dict[str, list[tuple[dict, float]]]] = {
    "text": {
        "linear_probe": [({}, 100.0)],
        "full": [({}, 1.0), ({}, 0.3)],
        "gradual_unfreeze": [({}, 3.0), ({"layer_decay": 0.8}, 3.0)],
        "discriminative": [({"layer_decay": 0.9}, 3.0), ({"layer_decay": 0.8}, 10.0)],
        "lora": [({"r": 8, "alpha": 16}, 10.0)],
        "lp_ft": [({"probe_lr_scale": 100.0}, 1.0)],
        "partial": [({"freeze_groups": 3}, 1.0)],
        "l2sp": [({"alpha": 0.01, "beta": 0.01}, 1.0)],
        "bitfit": [({}, 20.0)],
        "surgical": [({"last": 2}, 1.0)],
    },
    "image": {
        "linear_probe": [({}, 10.0)],
        "full": [({}, 1.0), ({}, 0.3)],
        "lora": [({"r": 8, "alpha": 16}, 2.0), ({"r": 8, "alpha": 16}, 5.0)],
        "partial": [({"freeze_groups": 3}, 1.0)],
        "discriminative": [({"layer_decay": 0.9}, 3.0), ({"layer_decay": 0.8}, 3.0)],
        "lp_ft": [({"probe_lr_scale": 10.0}, 1.0)],
        "gradual_unfreeze": [({}, 1.0)],
        "l2sp": [({"alpha": 0.01, "beta": 0.01}, 1.0)],
        "bitfit": [({}, 5.0)],
        "surgical": [({"last": 2}, 1.0)],
    },
}
# What auto considers unless strategy.candidates says otherwise, in the order the budget keeps
# them: the probe (the screen), full fine-tuning (the yardstick), then those that won a
# setting of the measured table (text: gradual_unfreeze and discriminative at 500 rows, partial
# at 2,000; images: lora and partial at 500, partial and discriminative at 2,000) and LP-FT.
DEFAULT_CANDIDATES = {
    "text": ["linear_probe", "full", "gradual_unfreeze", "discriminative", "partial", "lp_ft", "lora"],
    "image": ["linear_probe", "full", "lora", "partial", "discriminative", "lp_ft"],
}
SCREEN = "linear_probe"
DERIVED = ("every_steps", "probe_steps")


class AutoConfig(Section):
    name: Literal["auto"] = Field(
        description="auto: race candidate strategies on this data (successive halving on the validation "
        "metric, within `budget`), then train the winner to the end, continuing from its checkpoint."
    )
    budget: float = Field(
        3.0, ge=1.0, description="Total training, the race included, as a multiple of one full fine-tune "
        "(train.epochs epochs): every candidate's epoch counts as one.",
    )
    candidates: list[str] | None = Field(
        None, min_length=1, description="Strategies to consider (each with its measured learning-rate prior). "
        "Default: linear_probe, full and those that won some setting of bench/strategies.py, for the model's "
        "modality; the budget keeps them in this order.",
    )
    reduction_factor: int = Field(3, ge=2, description="Successive halving: 1 in this many candidates goes on at each rung.")
    screen: bool = Field(
        True, description="Race linear_probe first and continue no candidate that scores below it at a rung.",
    )

    @field_validator("candidates")
    @classmethod
    def _known(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        unknown = [n for n in names if n not in PRIORS["text"]]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}: auto can race {', '.join(PRIORS['text'])}")
        if len(set(names)) != len(names):
            raise ValueError("each strategy once")
        return names


@dataclass(frozen=True)
class Candidate:
    id: str  # "lora-2", a Train run's name too: lowercase, no spaces
    strategy: dict  # the strategy section, name included
    lr: float

    @property
    def label(self) -> str:
        # every_steps / probe_steps follow from the data's step count: not a setting to read
        extra = ", ".join(f"{k}={v}" for k, v in self.strategy.items() if k not in ("name", *DERIVED))
        return f"{self.strategy['name']} (lr {self.lr:g}{', ' + extra if extra else ''})"


@dataclass
class RacePlan:
    candidates: list[Candidate]
    rungs: list[int]  # epochs done at each rung; the last is train.epochs
    survivors: list[int]  # candidates that train to each rung (the first: all; the last: 1)
    budget_epochs: float
    left_out: list[str] = field(default_factory=list)  # settings the budget had no room for

    @property
    def planned_epochs(self) -> int:
        return epochs_needed(self.rungs, self.survivors)


def pipeline_lr(raw: dict) -> float | None:
    """optim.lr as the pipeline file sets it (None: not set), the rate full fine-tuning races at."""
    value = (raw.get("optim") or {}).get("lr")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # the schema reports it


def modality(model_family: str) -> Literal["text", "image"]:
    return "text" if model_family == "hf" else "image"


def rungs_for(epochs: int, eta: int) -> list[int]:
    """Geometric rungs ending at `epochs` (10 epochs, eta 3: [1, 3, 10]). A short run (up to eta + 1
    epochs) has a rung at every epoch: one epoch of a small dataset is a few steps, which leave
    close candidates apart by noise, so the few that go on are compared again (3 epochs: [1, 2, 3])."""
    if epochs <= eta + 1:
        return list(range(1, epochs + 1))
    rungs = {epochs}
    k = 1
    while (rung := round(epochs / eta**k)) >= 1 and k < 8:
        rungs.add(rung)
        k += 1
    return sorted(rungs | {1})


def survivors_for(count: int, rungs: list[int], eta: int) -> list[int]:
    kept = [count]
    for _ in rungs[1:-1]:
        kept.append(max(1, kept[-1] // eta))
    return kept + [1] if len(rungs) > 1 else kept


def epochs_needed(rungs: list[int], survivors: list[int]) -> int:
    return sum(n * (rung - before) for n, rung, before in zip(survivors, rungs, [0] + rungs[:-1]))


def _setting(name: str, section: dict, *, steps_per_epoch: int, epochs: int, groups: int) -> dict:
    resolved = {"name": name, **section}
    if name == "gradual_unfreeze":
        # the bench's measured schedule: one more group every steps/(2 x groups), all by mid-run
        resolved["every_steps"] = max(1, steps_per_epoch * epochs // (2 * groups))
    if name == "lp_ft":
        # half the first epoch: at the first rung the candidate has fine-tuned, not only probed
        resolved.pop("probe_epochs", None)
        resolved["probe_steps"] = max(1, steps_per_epoch // 2)
    return resolved


def plan_race(cfg: AutoConfig, kind: str, *, epochs: int, steps_per_epoch: int, groups: int,
              full_lr: float | None = None) -> RacePlan:  # fmt: skip
    """The candidates and rungs that fit `cfg.budget` full fine-tunes of `epochs` epochs; learning
    rates relative to `full_lr` (default: the modality's measured one). Raises ValueError when not
    even two candidates fit."""
    full_lr = full_lr or FULL_LR[kind]
    names = cfg.candidates or DEFAULT_CANDIDATES[kind]
    if cfg.screen and SCREEN not in names:
        names = [SCREEN, *names]
    elif cfg.screen:
        names = [SCREEN, *(n for n in names if n != SCREEN)]
    # first settings of every strategy in order, then the second ones, ...
    ranked = []
    for depth in range(max(len(PRIORS[kind][n]) for n in names)):
        ranked += [(n, PRIORS[kind][n][depth]) for n in names if depth < len(PRIORS[kind][n])]
    rungs = rungs_for(epochs, cfg.reduction_factor)
    budget_epochs = cfg.budget * epochs
    chosen: list[tuple[str, tuple[dict, float]]] = []
    left_out = []
    for item in ranked:
        if epochs_needed(rungs, survivors_for(len(chosen) + 1, rungs, cfg.reduction_factor)) <= budget_epochs:
            chosen.append(item)
        else:
            left_out.append(item)
    if len(chosen) < 2:
        need = epochs_needed(rungs, survivors_for(2, rungs, cfg.reduction_factor)) / epochs
        raise ValueError(f"strategy.budget={cfg.budget:g} leaves no room for a race of two candidates over "
                         f"train.epochs={epochs}: raise strategy.budget to {math.ceil(need * 10) / 10:g} or more")  # fmt: skip
    seen: dict[str, int] = {}
    candidates = []
    for name, (section, scale) in chosen:
        seen[name] = seen.get(name, 0) + 1
        setting = _setting(name, section, steps_per_epoch=steps_per_epoch, epochs=epochs, groups=groups)
        candidates.append(Candidate(f"{name}-{seen[name]}", setting, float(f"{full_lr * scale:.3g}")))
    return RacePlan(
        candidates, rungs, survivors_for(len(candidates), rungs, cfg.reduction_factor), budget_epochs,
        [f"{name} (lr {full_lr * scale:.3g})" for name, (_, scale) in left_out],
    )  # fmt: skip


def promote(scores: dict[str, float], count: int, mode: str, screen_score: float | None) -> list[str]:
    """The `count` best candidate ids by their score at a rung (ties: the earlier, cheaper-ranked
    candidate first), less those below the screen's score."""
    order = sorted(scores, key=lambda cid: scores[cid], reverse=(mode == "max"))
    if screen_score is not None:
        beats = (lambda s: s >= screen_score) if mode == "max" else (lambda s: s <= screen_score)
        order = [cid for cid in order if beats(scores[cid])]
    return order[:count]
