"""finetune: fine-tune pretrained models on your own data, on one machine or a Ray cluster.

    import finetune

    result = finetune.train("pipelines/sentiment-minilm.yaml", ["train.epochs=1"])
    result.metrics["test_accuracy"], result.warnings, result.report
    model = finetune.load(result.run_dir)
    model.predict(["a gripping, funny film", "two hours I will not get back"])
    finetune.export(result.run_dir, "onnx")  # also pt2, hf; checked against the trained model

train, tune, advise, evaluate, load, validate, export and serve do what the commands of the same name do
(`finetune.api`); a pipeline is a YAML file's path, a dict, or a PipelineConfig. Names load on
first use, so `import finetune` (and the CLI) stay quick.
"""

from __future__ import annotations

from importlib import import_module

_WHERE = {
    **dict.fromkeys(("train", "tune", "advise", "evaluate", "load", "validate", "export", "serve", "Result", "SweepResult",
                       "Advice", "FineTuned"), "finetune.api"),
    "PipelineConfig": "finetune.config",
    "ConfigError": "finetune.config",
    "DataError": "finetune.data",
    "TrainingDiverged": "finetune.training",
    "Interrupted": "finetune.training",
}  # fmt: skip
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
