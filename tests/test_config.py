import json
from pathlib import Path

import pytest
import yaml

from finetune import config
from finetune.cli import main
from finetune.config import ConfigError

PIPELINES = sorted(Path(__file__).parent.parent.joinpath("pipelines").glob("*.yaml"))


def load(path, overrides=None):
    """The schema's part of `finetune.checks.load_pipeline`: YAML, overrides, pydantic."""
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


def test_pipeline_files_as_editors_leave_them(tmp_path, capsys):
    """Mistakes in the file itself: each one line with the place to look."""
    cases = {
        "duplicate.yaml": (b"data:\n  source: a.csv\n  source: b.csv\nmodel: {name: minilm-l6}\n",
                           ", line 3, column 3: not valid YAML (key 'source' appears twice in this mapping (first on "
                           "line 2))"),
        "unclosed.yaml": (b"data:\n  source: [a.csv\nmodel: {name: minilm-l6}\n",
                          ", line 3, column 6: not valid YAML (while parsing a flow sequence: expected ',' or ']', "
                          "but got ':')"),
        "latin-1.yaml": ("name: café\ndata: {source: rotten_tomatoes}\nmodel: {name: minilm-l6}\n".encode("latin-1"),
                         ": byte 9 (0xe9) is not UTF-8 text; save the pipeline file as UTF-8"),
    }  # fmt: skip
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["validate", str(path)]) == 2
        out = capsys.readouterr().out
        assert f"  - {path}{expected}" in out and "Traceback" not in out, out
    bom = tmp_path / "bom.yaml"  # Windows editors write a UTF-8 byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(MINIMAL).encode())
    assert main(["validate", str(bom)]) == 0


def test_settings_that_would_fail_mid_run_fail_validate(tmp_path, tiny_bert_dir, capsys):
    data = {"source": "rotten_tomatoes"}
    cases = {
        "data.max_length=2048": "data.max_length=2048: minilm-l6 has 512 token positions; set data.max_length to 512 "
                                "or less (longer texts are truncated)",
        "data.val_fraction=0": "data.val_fraction=0 and no data.val_source: there would be no val rows to choose the "
                               "best checkpoint on; set data.val_fraction above 0 or give data.val_source",
        "data.test_fraction=0": "data.test_fraction=0 and no data.test_source: there would be no test rows to report "
                                "the final scores on",
    }  # fmt: skip
    for override, expected in cases.items():
        assert main(["validate", str(write(tmp_path, {**MINIMAL, "data": data})), override]) == 2
        assert expected in capsys.readouterr().out, override
    strategies = {
        ("strategy.name=lp_ft", "strategy.probe_epochs=2", "train.epochs=2"):
            "strategy.probe_epochs=2 with train.epochs=2: the probe takes the whole run and the body never trains",
        ("strategy.name=surgical", "strategy.groups=[block.0]"):
            "strategy.groups: 'block.0' is not a layer group of this model; its groups below the head are stem, "
            "bert.encoder.layer.0, ",
    }  # fmt: skip
    for overrides, expected in strategies.items():
        assert main(["validate", str(write(tmp_path, {**MINIMAL, "data": data})), *overrides]) == 2
        assert expected in capsys.readouterr().out, overrides
    erasing = {"source": str(tmp_path), "augment": [{"name": "random_erasing", "scale": [0.1, 1.5]}]}
    assert main(["validate", str(write(tmp_path, {"data": erasing, "model": {"name": "efficientnet-lite0"}}))]) == 2
    assert ("data.augment.0.scale: [0.1, 1.5]: a range of shares of the image, [low, high] with 0 < low <= high <= 1"
            in capsys.readouterr().out)  # fmt: skip

    with pytest.MonkeyPatch.context() as patch:  # torch.compile's kernels need a C++ compiler
        patch.setenv("PATH", str(tmp_path / "empty"))
        assert main(["validate", str(write(tmp_path, {**MINIMAL, "data": data})), "train.compile=true"]) == 2
    assert ("train.compile=true needs a C++ compiler where the workers run (none found here): install one "
            "(apt-get install g++) or set train.compile=false") in capsys.readouterr().out

    not_a_model = tmp_path / "downloads"
    not_a_model.mkdir()
    assert main(["validate", str(write(tmp_path, {**MINIMAL, "model": {"name": f"hf:{not_a_model}"}}))]) == 2
    out = capsys.readouterr().out
    assert f"model.name='hf:{not_a_model}' cannot be loaded: " in out and "config.json" in out

    # `~` is the home directory, as in a shell, wherever a path goes
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_bert_dir)
    reviews = (home / "reviews.csv")
    reviews.write_text("text,label\ngood,pos\nbad,neg\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        cfg = load(write(tmp_path, {"data": {"source": "~/reviews.csv", "max_length": 16}, "model": {"name": "hf:~/models/tiny"},
                                    "checkpoint": {"storage_path": "~/runs"}}))  # fmt: skip
        assert main(["validate", str(tmp_path / "pipeline.yaml")]) == 0
    assert (cfg.data.source, cfg.model.name, cfg.checkpoint.storage_path) == (
        str(reviews), f"hf:{home}/models/tiny", f"{home}/runs")  # fmt: skip


def test_credentials_in_a_uri_are_refused_before_anything_is_written(tmp_path, capsys):
    for key, value in (("data.source", "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/reviews.csv"),
                       ("checkpoint.storage_path", "https://user:hunter2@example.com/runs")):  # fmt: skip
        assert main(["validate", str(write(tmp_path, MINIMAL)), f"{key}={value}"]) == 2
        out = capsys.readouterr().out
        assert f"{key}: a URI with credentials in it would be written to the run's config.yaml and logs" in out
        assert "wJalrXUtnFEMI" not in out and "hunter2" not in out
    assert main(["validate", str(write(tmp_path, MINIMAL)), "checkpoint.storage_path=s3://bucket/runs"]) == 0


def test_every_runtime_dependency_has_a_lower_and_an_upper_bound():
    """An install made a year from now resolves to releases the code was written for."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    requirements += [r for r in extras if r.name != "finetune"]  # an extra may pull in others (`finetune[mlflow]`)
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        assert "==" in operators or ({">=", "<"} <= operators), f"{requirement} needs a lower and an upper bound"
    names = {r.name for r in requirements}
    assert {"numpy", "pydantic", "scikit-learn"} <= names
    assert str(next(r for r in requirements if r.name == "scikit-learn").specifier) == "<2,>=1.4"


def test_a_model_that_ships_code_runs_it_only_when_the_pipeline_says_so(tmp_path):
    from finetune.config import ModelConfig
    from finetune.models import check_model

    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "configuration_shipped.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class ShippedConfig(PretrainedConfig):\n    model_type = 'shipped'\n"
    )
    shipped = {"model_type": "shipped", "auto_map": {"AutoConfig": "configuration_shipped.ShippedConfig"}}
    (folder / "config.json").write_text(json.dumps(shipped))
    (problem,) = check_model(ModelConfig(name=f"hf:{folder}"))
    assert problem.startswith(f"model.name='hf:{folder}' cannot be loaded: ") and "trust_remote_code" in problem
    assert check_model(ModelConfig(name=f"hf:{folder}", trust_remote_code=True)) == []


def test_trial_configs_get_absolute_paths_and_names_stay(tmp_path, monkeypatch):
    """A sweep's or race's trials run in Tune's processes, not where the command ran: relative
    paths that exist there become absolute; builtin names, hub ids and URIs stay as written."""
    from finetune.config import with_absolute_paths

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\n")
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    raw = {"data": {"source": "data/train.csv", "test_source": "s3://bucket/test.csv", "val_source": "none/val.csv"},
           "model": {"name": "hf:model"}, "checkpoint": {"storage_path": "ray/results"}}  # fmt: skip
    out = with_absolute_paths(raw)
    assert out["data"]["source"] == str(tmp_path / "data" / "train.csv")
    assert out["model"]["name"] == f"hf:{tmp_path / 'model'}"
    assert out["data"]["test_source"] == "s3://bucket/test.csv" and out["data"]["val_source"] == "none/val.csv"
    assert out["checkpoint"]["storage_path"] == str(tmp_path / "ray" / "results")  # an output: made absolute
    assert raw["data"]["source"] == "data/train.csv"  # the pipeline as written is left alone
    assert with_absolute_paths({"data": {"source": "rotten_tomatoes"}, "model": {"name": "minilm-l6"}}) == {
        "data": {"source": "rotten_tomatoes"}, "model": {"name": "minilm-l6"}}  # fmt: skip
