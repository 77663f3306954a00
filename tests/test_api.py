"""The Python API (`import finetune`), as a notebook uses it: the README's example, run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import finetune
from finetune.cli import main
from helpers import tiny_sentiment_pipeline


def test_import_finetune_stays_light_and_names_its_api():
    loaded = subprocess.run([sys.executable, "-c", "import sys, finetune; finetune.train; finetune.load; "
                             "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert loaded.strip() == "[]"  # the API's names load their layers when called
    assert {"train", "tune", "evaluate", "load", "validate", "Result", "ConfigError", "DataError"} <= set(dir(finetune))


def test_a_pipeline_is_a_path_a_dict_or_a_config_and_mistakes_are_exceptions(tmp_path, tiny_bert_dir):
    path = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=40)
    raw = yaml.safe_load(path.read_text())
    from_path = finetune.validate(path, ["optim.lr=1e-4"])
    from_dict = finetune.validate(raw, ["optim.lr=1e-4"])
    assert from_path == from_dict and from_dict.optim.lr == 1e-4 and raw["optim"]["lr"] == 3e-3  # the dict is not changed
    assert finetune.validate(from_dict, ["train.epochs=7"]).train.epochs == 7
    with pytest.raises(finetune.ConfigError) as error:
        finetune.validate({**raw, "optim": {"lr": -1}})
    assert any("optim.lr" in problem for problem in error.value.problems)
    with pytest.raises(finetune.ConfigError, match="has no tune section"):
        finetune.tune(raw)
    with pytest.raises(finetune.ConfigError, match="give a pipeline"):
        finetune.train()


@pytest.mark.e2e
def test_the_readme_example_trains_predicts_and_evaluates_like_the_cli(ray_session, tmp_path, tiny_bert_dir, capsys):
    pipeline = yaml.safe_load(tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=400).read_text())

    # README, "Python API"
    result = finetune.train(pipeline, ["train.epochs=3"], run_dir=tmp_path / "run")
    print(result.metrics["test_accuracy"], result.warnings, result.report)
    model = finetune.load(result.run_dir)
    predictions = model.predict(["a really great film", "the plot was dull"])
    metrics = finetune.evaluate(result.run_dir, "test")

    assert result.run_dir == (tmp_path / "run").resolve() and result.best == result.run_dir / "best"
    assert result.metrics["test_accuracy"] > 0.9 and result.report.is_file() and result.warnings == []
    assert metrics["test/accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    assert model.labels == ["neg", "pos"] and model.task == "classification"
    capsys.readouterr()
    assert main(["predict", str(result.run_dir), "a really great film", "the plot was dull"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed] == [p["text"].split("\t") for p in predictions]
    assert [p["label"] for p in predictions] == ["pos", "neg"]
