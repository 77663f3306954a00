"""The Python API: what `finetune`'s commands do, as functions a notebook or a script calls.
The CLI is a thin layer over these. Mistakes are exceptions (ConfigError, DataError,
TrainingDiverged), never an exit.

A pipeline is a YAML file's path, the same mapping as a dict, or a `PipelineConfig`; overrides
are `key.sub=value` strings, as on the command line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console

from finetune import config as config_module
from finetune.config import ConfigError, PipelineConfig

Pipeline = str | Path | dict | PipelineConfig


def _raw(pipeline: Pipeline, overrides: Sequence[str]) -> dict:
    """The pipeline as the mapping a YAML file holds, overrides applied."""
    if isinstance(pipeline, (str, Path)):
        return config_module.read_raw(pipeline, list(overrides))
    if isinstance(pipeline, PipelineConfig):
        raw = pipeline.model_dump(mode="json", exclude_none=True)
    elif isinstance(pipeline, dict):
        raw = copy.deepcopy(pipeline)
    else:
        raise ConfigError([f"a pipeline is a YAML file's path, a dict or a PipelineConfig, not {type(pipeline).__name__}"])
    return config_module.apply_overrides(raw, list(overrides))


def validate(pipeline: Pipeline, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The pipeline checked as `finetune validate` checks it (schema, registries, files, the
    strategy on the model's structure); raises ConfigError listing every problem."""
    from finetune.checks import check_pipeline

    return check_pipeline(_raw(pipeline, overrides))


@dataclass(frozen=True)
class Result:
    """A finished run: its folder and what its summary.json says."""

    run_dir: Path
    summary: dict

    @property
    def metrics(self) -> dict[str, float]:
        """The test metrics of the fine-tuned model (test_accuracy, test_macro_f1, ...)."""
        return {k: v for k, v in self.summary.items() if k.startswith("test_") and v is not None}

    @property
    def best(self) -> Path | None:
        """The best model's folder (what `load`, `evaluate` and `finetune predict` use)."""
        return Path(self.summary["best_checkpoint"]) if self.summary.get("best_checkpoint") else None

    @property
    def warnings(self) -> list[str]:
        """What the run's verdict says is wrong with the model (empty: nothing found)."""
        return self.summary.get("warnings", [])

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"


def train(pipeline: Pipeline | None = None, overrides: Sequence[str] = (), run_dir: str | Path | None = None, *,
          resume: str | Path | None = None, console: Console | None = None) -> Result:  # fmt: skip
    """Fine-tune as the pipeline says (`finetune train`), in RUN_DIR (default runs/<name>-<time>);
    `resume=RUN_DIR` instead continues a run whose driver died, from its latest checkpoint."""
    from finetune.training import driver

    if resume is not None:
        if pipeline is not None or run_dir is not None or overrides:
            raise ConfigError(["train(resume=RUN_DIR) takes no pipeline, overrides or run_dir: it reruns the run's own"])
        summary = driver.resume(Path(resume), console)
    else:
        if pipeline is None:
            raise ConfigError(["train: give a pipeline (or resume=RUN_DIR)"])
        raw = _raw(pipeline, overrides)
        cfg = validate(raw)
        folder = Path(run_dir) if run_dir else driver.default_run_dir(cfg)
        if cfg.strategy.name == "auto":
            from finetune.tuning import race

            summary = race.train_auto(cfg, raw, folder, console)
        else:
            summary = driver.run(cfg, folder, console)
    return Result(Path(summary["run_dir"]), summary)


@dataclass(frozen=True)
class Advice:
    """A strategy race without the winner's final training (`finetune advise`)."""

    folder: Path
    race: dict  # race.json: every candidate's scores by rung, cost and outcome; the winner

    @property
    def best_pipeline(self) -> Path:
        """best.yaml: the pipeline with the winner's strategy and learning rate, for `train` as is."""
        return self.folder / "best.yaml"


def as_auto(raw: dict) -> dict:
    """The pipeline with strategy.name=auto; auto's own keys given for another strategy (an
    override such as strategy.budget=2) are kept, that strategy's keys are not."""
    from finetune.strategies.auto import AutoConfig

    section = raw.get("strategy") or {}
    if section.get("name") != "auto":
        kept = {key: value for key, value in section.items() if key in AutoConfig.model_fields and key != "name"}
        raw = {**raw, "strategy": {"name": "auto", **kept}}
    return raw


def advise(pipeline: Pipeline, overrides: Sequence[str] = (), folder: str | Path | None = None, *,
           console: Console | None = None) -> Advice:  # fmt: skip
    """Race the candidate strategies on the pipeline's data (`finetune advise`) and say which to
    use, without training the winner to the end. The pipeline's strategy section is used when it
    is `auto` (its budget and candidates); any other strategy is replaced by `auto`'s defaults."""
    from finetune.tuning import race

    raw = as_auto(_raw(pipeline, overrides))
    cfg = validate(raw)
    folder = Path(folder) if folder else race.default_advise_dir(cfg)
    return Advice(folder.resolve(), race.advise(cfg, raw, folder, console))


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its folder and what its summary.json says."""

    sweep_dir: Path
    summary: dict

    @property
    def best(self) -> Path | None:
        """The best trial's model folder; None when no trial finished an epoch."""
        best = self.summary.get("best") or {}
        return Path(best["checkpoint"]) if best.get("checkpoint") else None

    @property
    def best_pipeline(self) -> Path | None:
        """best.yaml: the pipeline with the best values, for `train` as is."""
        best = self.summary.get("best") or {}
        return Path(best["pipeline"]) if best.get("pipeline") else None

    @property
    def report(self) -> Path:
        return self.sweep_dir / "report.html"


def tune(pipeline: Pipeline | None = None, overrides: Sequence[str] = (), sweep_dir: str | Path | None = None, *,
         resume: str | Path | None = None, retry_errored: bool = False, console: Console | None = None) -> SweepResult:  # fmt: skip
    """A Ray Tune sweep over the pipeline's tune section (`finetune tune`); `resume=SWEEP_DIR`
    continues an interrupted one (errored trials run again only with `retry_errored`)."""
    from finetune.tuning import sweep as sweeps

    if resume is not None:
        if pipeline is not None or sweep_dir is not None or overrides:
            raise ConfigError(["tune(resume=SWEEP_DIR) takes no pipeline, overrides or sweep_dir: it reruns the sweep's own"])
        summary = sweeps.resume(Path(resume), retry_errored=retry_errored, console=console)
    else:
        if pipeline is None:
            raise ConfigError(["tune: give a pipeline (or resume=SWEEP_DIR)"])
        raw = _raw(pipeline, overrides)
        cfg = validate(raw)
        if cfg.tune is None:
            named = pipeline if isinstance(pipeline, (str, Path)) else "the pipeline"
            raise ConfigError([f"{named} has no tune section: add tune.search_space to sweep"])
        summary = sweeps.sweep(cfg, raw, Path(sweep_dir) if sweep_dir else sweeps.default_sweep_dir(cfg), console)
    return SweepResult(Path(summary["sweep_dir"]), summary)


def evaluate(run_dir: str | Path, split: str = "test") -> dict[str, float]:
    """The metrics of a run's (or a sweep's) best model on one split, rebuilt from its own data config and seed."""
    from finetune.inference import evaluate_run

    return evaluate_run(run_dir, split)


class FineTuned:
    """A run's best model (or its yardstick), loaded once, with no Ray: `predict` as often as needed."""

    def __init__(self, run_dir: str | Path, model: str = "fine_tuned") -> None:
        from finetune.inference import load_run

        self.run_dir = Path(run_dir)
        self.config, self._saved = load_run(run_dir)
        if model == "yardstick":
            from finetune import yardstick

            self._saved = yardstick.load(run_dir)
        elif model != "fine_tuned":
            raise ValueError(f"model={model!r}: fine_tuned (the run's best model) or yardstick")

    @property
    def labels(self) -> list[str]:
        return self._saved.label_names

    @property
    def task(self) -> str:
        return self._saved.task.type

    def predict(self, inputs: Sequence[str]) -> list[dict]:
        """For each text (text models) or image path (image models): what `finetune predict`
        prints, as a dict (label and probabilities, labels at their thresholds, or the value)."""
        from finetune.inference import predict_with

        return predict_with(self._saved, list(inputs))


def load(run_dir: str | Path, model: str = "fine_tuned") -> FineTuned:
    """A run's (or a sweep's) best model, for predictions; `model="yardstick"`: the run's yardstick
    (TF-IDF + a linear model, fit on the same training rows)."""
    return FineTuned(run_dir, model)


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, quantize: str | None = None):
    """A run's best model as onnx, pt2 (torch.export) or a Hugging Face folder, in `out` (default
    RUN_DIR/export/FORMAT), checked against the trained model on the run's own test rows; returns
    an `Exported` (folder, file, max_abs_diff, int8 figures). `quantize="int8"` (onnx): an int8 copy too."""
    from finetune.export import export_run

    return export_run(run_dir, format, out, quantize)


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, max_batch_size: int = 16,
          batch_wait_s: float = 0.01, cpus_per_replica: float = 1.0, image_root: str | Path | None = None,
          blocking: bool = True, console: Console | None = None) -> str | None:  # fmt: skip
    """An HTTP endpoint (Ray Serve) for a run's best model: POST /predict {"inputs": [...]}, GET
    /health. `blocking`: serve until Ctrl-C or SIGTERM (the CLI); else return its URL at once (stop
    it with `finetune.serving.stop()`)."""
    from finetune import serving

    options = serving.ServeOptions(host, port, replicas, max_batch_size, batch_wait_s, cpus_per_replica,
                                   str(image_root) if image_root else None)  # fmt: skip
    if not blocking:
        return serving.start(run_dir, options)
    serving.serve_until_interrupted(run_dir, options, console or Console())
    return None


def report(folder: str | Path) -> Path:
    """Draw report.html again for a run or a sweep folder; returns its path."""
    from finetune.report import write_report

    return write_report(folder)

