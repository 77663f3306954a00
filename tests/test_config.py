from pathlib import Path

import pytest
import yaml

from finetune import config
from finetune.cli import main
from finetune.config import ConfigError

PIPELINES = sorted(Path(__file__).parent.parent.joinpath("pipelines").glob("*.yaml"))


def load(path, overrides=None):
    """The schema's part of `finetune.validate.load_pipeline`: YAML, overrides, pydantic."""
    return config.parse(config.read_raw(path, overrides))


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MINIMAL = {"data": {"source": "rotten_tomatoes"}, "model": {"name": "minilm-l6"}}


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipelines_are_valid(path):
    assert main(["validate", str(path)]) == 0


def test_defaults_fill_every_section(tmp_path):
    cfg = load(write(tmp_path, MINIMAL))
    assert cfg.strategy.name == "full"
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 5e-5
    assert cfg.checkpoint.metric == "val/accuracy" and cfg.checkpoint.mode == "max"
    assert cfg.scaling.num_workers == 1


def test_overrides_are_typed_and_create_sections(tmp_path):
    cfg = load(
        write(tmp_path, MINIMAL),
        ["optim.lr=3e-4", "train.epochs=7", "scaling.use_gpu=true", "train.precision=bf16", "data.image_size=96"],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 7
    assert cfg.scaling.use_gpu is True
    assert cfg.data.image_size == 96


def test_every_problem_is_reported_at_once(tmp_path):
    raw = {**MINIMAL, "optim": {"lr": -1, "name": "lion"}, "train": {"epoch": 3}}
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path, raw))
    problems = error.value.problems
    assert any(p.startswith("optim.lr:") and "greater than 0" in p for p in problems)
    assert any(p.startswith("optim.name:") and "'adamw'" in p and "'sgd'" in p for p in problems)
    assert any(p.startswith("train.epoch: unknown key") and "epochs" in p for p in problems)
    assert len(problems) == 3


def test_missing_sections_are_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path, {"data": {"source": "x.csv"}}))
    assert error.value.problems == ["model: required, not set"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_fraction=0.95", "data.val_fraction (0.95) + data.test_fraction (0.1) must be below 1"),
        ("checkpoint.mode=max", None),
        ("train.precision=fp16", "train.precision=fp16 with scaling.use_gpu=false"),
    ],
)
def test_cross_field_checks_quote_both_keys(tmp_path, override, message):
    path = write(tmp_path, {**MINIMAL, "checkpoint": {"metric": "val/loss"}} if "mode" in override else MINIMAL)
    with pytest.raises(ConfigError) as error:
        load(path, [override])
    expected = message or "checkpoint.mode=max with checkpoint.metric=val/loss"
    assert any(expected in p for p in error.value.problems), error.value.problems


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load(write(tmp_path, MINIMAL), ["optim.lr"])
    with pytest.raises(ConfigError, match="model.name is a value, not a section"):
        load(write(tmp_path, MINIMAL), ["model.name.x=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = load(write(tmp_path, MINIMAL), ["train.seed=5"])
    config.save(cfg, tmp_path / "resolved.yaml")
    assert load(tmp_path / "resolved.yaml") == cfg


def test_cli_exits_2_with_a_message_and_no_traceback(tmp_path, capsys):
    path = write(tmp_path, {**MINIMAL, "model": {"name": "resnet-9000"}, "train": {"batch_size": "big"}})
    assert main(["train", str(path), "data.source=/no/such/file.csv"]) == 2
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert "train.batch_size: Input should be a valid integer" in out
    assert "model.name='resnet-9000' is not a known model" in out
    assert "data.source: /no/such/file.csv does not exist" in out


def test_cli_overrides_may_follow_options(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "scaling.placement_strategy=EVERYWHERE"]) == 2
    assert "scaling.placement_strategy: Input should be 'PACK', 'SPREAD'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_status:  # an unknown option is still an argparse error
        main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--no-such-option"])
    assert exit_status.value.code == 2 and not (tmp_path / "run").exists()


def test_cli_missing_pipeline_file(capsys):
    assert main(["validate", "/no/pipeline.yaml"]) == 2
    assert "pipeline file /no/pipeline.yaml does not exist" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["strategy.name=partial", "strategy.freeze_groups=12"], "strategy.freeze_groups=12: this model has 9 layer groups"),
     (["strategy.name=partial", "strategy.freeze_regex=nothing"], "strategy.freeze_regex='nothing' matches no parameter"),
     (["model.layer_groups=[embeddings]"], "model.layer_groups: 98 parameters match no group"),
     (["model.layer_groups=['(']"], "model.layer_groups: '(' is not a regex"),
     (["strategy.name=lora", "strategy.target_modules=[qqq]"], "strategy.target_modules=['qqq']: Target modules {'qqq'} not found")],
)  # fmt: skip
def test_strategy_is_checked_against_the_model_before_training(tmp_path, capsys, overrides, message):
    assert main(["validate", str(write(tmp_path, MINIMAL)), *overrides]) == 2
    assert message in capsys.readouterr().out
