"""`finetune tune`: search-space parsing, a real ASHA sweep, best.yaml, resume after a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray import tune

from browser import check_report
from helpers import ctrl_c, mlflow_history, process_group, sentiment_rows, tiny_sentiment_pipeline, write_csv
from finetune.cli import main
from finetune.config import ConfigError, parse
from finetune.tuning.space import check_search_space, param_space, trial_config, trial_count, used_params

BASE = {"data": {"source": "reviews.csv"}, "model": {"name": "minilm-l6"}}


def _tune(search_space: dict, **extra) -> dict:
    return {**BASE, "tune": {"search_space": search_space, **extra}}


def test_every_kind_becomes_its_tune_domain():
    cfg = parse(_tune({
        "optim.lr": {"loguniform": [1e-5, 1e-3]}, "optim.weight_decay": {"uniform": [0.0, 0.1]},
        "train.batch_size": {"choice": [16, 32]}, "train.epochs": {"randint": [1, 4]},
        "strategy.name": {"grid": ["full", "lora"]},
    }, num_samples=3)).tune  # fmt: skip
    space = param_space(cfg)
    assert isinstance(space["optim.lr"], tune.search.sample.Float)
    assert (space["optim.lr"].lower, space["optim.lr"].upper) == (1e-5, 1e-3)
    assert isinstance(space["optim.lr"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["optim.weight_decay"].get_sampler(), tune.search.sample.Uniform)
    assert space["train.batch_size"].categories == [16, 32]
    assert (space["train.epochs"].lower, space["train.epochs"].upper) == (1, 4)
    assert space["strategy.name"] == {"grid_search": ["full", "lora"]}
    assert trial_count(cfg) == 6  # num_samples x the grid
    assert cfg.scheduler.name == "asha" and cfg.search_alg == "random"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "tune.search_space.optim.lr: loguniform: both bounds must be > 0"),
        ({"optim.lr": {"uniform": [1e-3, 1e-5]}}, "uniform: [low, high] with low < high"),
        ({"optim.lr": {"uniform": [0.1, 0.2], "choice": [1]}}, "give exactly one of"),
        ({"optim.lr": {}}, "give exactly one of uniform, loguniform, randint, choice, grid (got none)"),
        ({"optim.lr": {"between": [1, 2]}}, "tune.search_space.optim.lr.between: unknown key"),
        ({"optim.lr": {"choice": []}}, "tune.search_space.optim.lr.choice"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ConfigError) as error:
        parse(_tune(spec))
    assert any(message in problem for problem in error.value.problems), error.value.problems


def test_searched_values_are_checked_against_the_schema():
    def problems(space: dict, **extra) -> list[str]:
        raw = _tune(space, **extra)
        return check_search_space(raw, parse(raw).tune)

    assert problems({"optim.lr": {"loguniform": [1e-5, 1e-3]}}) == []
    assert problems({"optim.lerning_rate": {"choice": [1e-3]}}) == [
        "tune.search_space.optim.lerning_rate=0.001: optim.lerning_rate: unknown key "
        "(allowed: name, lr, weight_decay, no_decay, momentum, nesterov, betas, eps, alpha)"
    ]
    assert "train.batch_size: Input should be greater than or equal to 1" in problems(
        {"train.batch_size": {"choice": [0, 8]}}
    )[0]
    assert problems({"strategy.layer_decay": {"uniform": [0.5, 0.9]}}) == [
        "tune.search_space.strategy.layer_decay: strategy full has no such key"
    ]
    # with strategy.name searched, a strategy's own key is fine when some searched strategy has it
    assert problems({"strategy.name": {"choice": ["full", "discriminative"]},
                     "strategy.layer_decay": {"uniform": [0.5, 0.9]}}) == []  # fmt: skip
    assert problems({"strategy.name": {"choice": ["full", "bitfit"]}, "strategy.r": {"choice": [4]}}) == [
        "tune.search_space.strategy.r: no searched strategy has such key"
    ]
    with pytest.raises(ConfigError, match="tune.search_alg=optuna cannot run grid keys"):
        parse(_tune({"optim.lr": {"grid": [1e-3]}}, search_alg="optuna"))
    with pytest.raises(ConfigError, match="max_t: required when time_attr=steps"):
        parse(_tune({"optim.lr": {"grid": [1e-3]}}, scheduler={"name": "asha", "time_attr": "steps"}))


def test_search_algorithms_and_schedulers():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from finetune.tuning.space import check_search_alg
    from finetune.tuning.sweep import _scheduler, _search_alg

    cfg = parse(_tune({"optim.lr": {"loguniform": [1e-5, 1e-3]}}, search_alg="optuna",
                      scheduler={"name": "asha", "time_attr": "steps", "max_t": 300, "grace_period": 20}))  # fmt: skip
    assert isinstance(_search_alg(cfg), OptunaSearch) and check_search_alg(cfg.tune) == []
    asha = _scheduler(cfg)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "steps_done" and asha._max_t == 300
    fifo = parse(_tune({"optim.lr": {"grid": [1e-3]}}, scheduler={"name": "fifo"}))
    assert isinstance(_scheduler(fifo), FIFOScheduler)
    assert isinstance(_search_alg(fifo), tune.search.BasicVariantGenerator)
    missing = parse(_tune({"optim.lr": {"uniform": [0.1, 0.2]}}, search_alg="hyperopt")).tune
    import importlib.util

    if importlib.util.find_spec("hyperopt") is None:  # as here and in CI: the test extra has optuna only
        assert check_search_alg(missing) == ['tune.search_alg=hyperopt needs the hyperopt package: pip install hyperopt '
                                             '(or pip install "finetune[search]")']
    else:
        assert check_search_alg(missing) == [] and type(_search_alg(parse(_tune({"optim.lr": {"uniform": [0.1, 0.2]}},
                                                                                search_alg="hyperopt")))).__name__ == "HyperOptSearch"


def test_a_trial_runs_the_pipeline_with_its_values():
    raw = _tune({"strategy.name": {"choice": ["full", "discriminative"]}, "strategy.layer_decay": {"uniform": [0.5, 0.9]}},
                metric="val/loss")  # fmt: skip
    full = trial_config(raw, {"strategy.name": "full", "strategy.layer_decay": 0.7, "optim.lr": 1e-4})
    assert full.strategy.name == "full" and full.optim.lr == 1e-4 and full.tune is None
    assert (full.checkpoint.metric, full.checkpoint.mode) == ("val/loss", "min")  # trials keep what the sweep ranks
    decayed = trial_config(raw, {"strategy.name": "discriminative", "strategy.layer_decay": 0.7})
    assert decayed.strategy.layer_decay == 0.7
    assert used_params(raw, {"strategy.name": "full", "strategy.layer_decay": 0.7}) == {"strategy.name": "full"}


def test_validate_refuses_a_bad_search_space_with_exit_2(tmp_path, capsys):
    pipeline = tmp_path / "sweep.yaml"
    raw = _tune({"optim.lr": {"loguniform": [1e-5, 1e-3]}, "train.batchsize": {"choice": [8, 16]}})
    raw["data"]["source"] = str(write_csv(tmp_path / "reviews.csv", sentiment_rows(20)))
    pipeline.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(pipeline)]) == 2
    assert "tune.search_space.train.batchsize=8: train.batchsize: unknown key" in capsys.readouterr().out
    assert main(["tune", str(pipeline), "tune.search_space.train.batchsize.choice=null"]) == 2
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "tune"}))
    assert main(["tune", str(tmp_path / "plain.yaml")]) == 2
    assert "has no tune section" in capsys.readouterr().out


def sweep_pipeline(tmp_path: Path, tiny_bert_dir: Path, rows: int, tune_section: dict) -> Path:
    return tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=rows, data={"val_fraction": 0.2}, tune=tune_section)


@pytest.mark.e2e
def test_asha_stops_weak_trials_and_best_yaml_is_the_best_trial(ray_session, tmp_path, tiny_bert_dir, capsys):
    """Trials run one at a time in grid order: the good learning rate first reaches each rung, so
    ASHA (reduction factor 2) stops the one that barely learns at its first rung."""
    pipeline = sweep_pipeline(tmp_path, tiny_bert_dir, 400, {
        "search_space": {"optim.lr": {"grid": [3e-3, 1e-6]}},
        "num_samples": 1, "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    })  # fmt: skip
    pipeline.write_text(yaml.safe_dump({**yaml.safe_load(pipeline.read_text()), "tracking": {"mlflow": {}}}))
    sweep_dir = tmp_path / "sweep"
    assert main(["tune", str(pipeline), "--sweep-dir", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "sweep: 2 trials, ranked by val/accuracy" in out and "retrain with: finetune train" in out

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["errored"] == 0
    assert summary["stopped_early"] == 1
    assert summary["best"]["params"] == {"optim.lr": 3e-3}
    assert summary["trial_epochs"] < 2 * 3
    assert summary["best"]["test/accuracy"] > 0.9 and summary["best"]["test/samples"] > 0
    import pandas as pd

    table = pd.read_csv(sweep_dir / "results.csv").set_index("optim.lr")
    assert table.loc[3e-3, "epochs_run"] == 3 and not table.loc[3e-3, "stopped_early"]
    assert table.loc[1e-6, "stopped_early"] and table.loc[1e-6, "epochs_run"] < 3
    # each trial's record holds every epoch Tune saw, the one Tune stopped it at included, each once and
    # in order; the stopped trial may have trained on while Tune's stop was on its way (its epochs are
    # a fraction of a second here: one CI run saw two more), and those epochs are recorded too
    recorded = {}
    for row in table.itertuples():
        epochs = [json.loads(e)["epochs_done"] for e in (sweep_dir / "trials" / row.trial / "metrics.jsonl").open()]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= row.epochs_run
        assert row.stopped_early or len(epochs) == row.epochs_run
        recorded[row.Index] = len(epochs)
    opened = check_report(sweep_dir / "report.html", {"trial curves", "parallel coordinates", "epochs per trial"},
                          screenshot=tmp_path / "sweep-report.png")  # fmt: skip
    winner = table.loc[3e-3, "trial"]
    assert f"trial {winner}: val/accuracy" in opened.text and "stopped early" in opened.text
    assert (sweep_dir / "best" / "model.safetensors").is_file()
    # MLflow: Tune ends both trials' processes (ASHA at max_t too): the sweep closes their runs, saying which stopped early
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((sweep_dir / "tracking.json").read_text())["mlflow_run_id"]
    children = {float(r.data.params["optim.lr"]): r for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")}  # fmt: skip
    assert children[3e-3].info.status == "FINISHED" and children[3e-3].data.tags["finetune.stopped_early"] == "false"
    assert children[1e-6].info.status == "KILLED" and children[1e-6].data.tags["finetune.stopped_early"] == "true"
    for lr in (3e-3, 1e-6):  # the epoch Tune stopped each at is logged too, and no epoch the record lacks
        logged = len(mlflow_history(client.tracking_uri, children[lr].info.run_id)["epoch"])
        assert table.loc[lr, "epochs_run"] <= logged <= recorded[lr]
    assert client.get_run(parent_id).info.status == "FINISHED"

    # best.yaml is the best trial's pipeline, a plain pipeline file `finetune train` takes as is
    best_raw = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert "tune" not in best_raw and best_raw["optim"]["lr"] == 3e-3 and best_raw["name"] == "tiny-best"
    assert main(["validate", str(sweep_dir / "best.yaml")]) == 0
    trial = trial_config(yaml.safe_load(pipeline.read_text()), {"optim.lr": 3e-3}).model_dump()
    assert {**parse(best_raw).model_dump(), "name": trial["name"]} == trial
    # the sweep folder serves the best model like a run folder does
    capsys.readouterr()
    assert main(["evaluate", str(sweep_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["test/accuracy"] == pytest.approx(summary["best"]["test/accuracy"])
    # its model card: the best trial's test figures and the command that retrains it
    card = (sweep_dir / "best" / "README.md").read_text()
    tested = yaml.safe_load(card.split("---\n")[1])["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in tested}["accuracy"] == pytest.approx(summary["best"]["test/accuracy"], abs=1e-4)
    assert "the best of 2 trials of a sweep" in card and f"finetune train {sweep_dir.name}/best.yaml" in card


def _trial_states(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> status, from the experiment state Tune keeps in the sweep folder."""
    states = sorted((sweep_dir / "sweep").glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):
        return {}  # being written
    return {t["trial_id"]: t["status"] for t in (json.loads(data) for data, _ in trials)}


def _has_checkpoint(trial_dir: Path) -> bool:
    """Ray Train's controller has taken a checkpoint of the trial's run as its latest (what a
    resumed trial continues from: the checkpoint's folder appears before that)."""
    try:
        snapshot = json.loads((trial_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def _epochs_reported(sweep_dir: Path, trial: str) -> list[int]:
    path = next((sweep_dir / "sweep").glob(f"*{trial}*/result.json"))
    return [r["epochs_done"] for r in map(json.loads, path.read_text().splitlines()) if "epochs_done" in r]


def _report_times(sweep_dir: Path, trial: str, after: float = 0.0) -> list[int]:
    path = next((sweep_dir / "sweep").glob(f"*{trial}*/result.json"))
    reports = map(json.loads, path.read_text().splitlines())
    return [r["timestamp"] for r in reports if "epochs_done" in r and r["timestamp"] > after]


@pytest.mark.e2e
def test_resume_after_the_driver_is_killed(ray_session, tmp_path, tiny_bert_dir, capsys):
    """The driver dies after the first trial errored (its model folder was still empty), the
    second finished and the third trained an epoch. `--resume --retry-errored` reruns the first
    (its folder filled meanwhile), continues the third from its checkpoint, leaves the second
    alone, and runs the two restored trials one at a time as tune.max_concurrent_trials says
    (Tune itself would start every restored trial at once)."""
    import shutil

    empty_model, model_copy = tmp_path / "model-being-copied", tmp_path / "model-copy"
    empty_model.mkdir()
    shutil.copytree(tiny_bert_dir, model_copy)
    pipeline = sweep_pipeline(tmp_path, tiny_bert_dir, 400, {
        "search_space": {"model.name": {"grid": [f"hf:{empty_model}", f"hf:{tiny_bert_dir}", f"hf:{model_copy}"]}},
        "num_samples": 1, "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1,
    })  # fmt: skip
    pipeline.write_text(yaml.safe_dump({**yaml.safe_load(pipeline.read_text()), "tracking": {"mlflow": {}}}))
    sweep_dir = tmp_path / "sweep"
    # a second driver on the test session's Ray, which (as any local Ray now) wants its auth token
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "tune", str(pipeline), "train.epochs=3", "--sweep-dir", str(sweep_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            states = _trial_states(sweep_dir)
            by_status = {status: [t for t, s in states.items() if s == status] for status in states.values()}
            running = by_status.get("RUNNING", [])
            # kill once the third trial has saved a checkpoint (so it has something to resume)
            if len(states) == 3 and running and _has_checkpoint(sweep_dir / "train" / running[0]):
                break
            assert driver.poll() is None, f"the sweep ended (exit {driver.returncode}) before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("the third trial never reported")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_at = time.time()
    (errored,), (finished,), (interrupted,) = by_status["ERROR"], by_status["TERMINATED"], running
    finished_train = sweep_dir / "train" / finished / "checkpoint_manager_snapshot.json"
    snapshot = (finished_train.read_text(), finished_train.stat().st_mtime)
    shutil.copytree(tiny_bert_dir, empty_model, dirs_exist_ok=True)  # the copy the first trial missed ends

    assert main(["tune", "--resume", str(sweep_dir), "--retry-errored"]) == 0
    assert "resuming sweep" in capsys.readouterr().out
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["errored"] == 0 and summary["trial_epochs"] == 9
    assert (finished_train.read_text(), finished_train.stat().st_mtime) == snapshot  # not trained again
    resumed = _epochs_reported(sweep_dir, interrupted)
    assert resumed[-1] == 3 and len(resumed) == len(set(resumed))  # no epoch reported twice
    reports = [json.loads(line) for line in next((sweep_dir / "sweep").glob(f"*{interrupted}*/result.json")).open()]
    assert min(r["epochs_done"] for r in reports if "epochs_done" in r and r["timestamp"] > killed_at) >= 2  # continued
    assert _epochs_reported(sweep_dir, errored) == [1, 2, 3]
    assert set(_trial_states(sweep_dir).values()) == {"TERMINATED"}
    # one at a time: every epoch of one restored trial was reported before any of the other's
    times = [_report_times(sweep_dir, t, killed_at) for t in (errored, interrupted)]
    assert all(times), times  # both trained after the resume
    first, second = sorted(times, key=min)
    assert max(first) <= min(second), (first, second)
    # MLflow: the resumed sweep kept its parent run and each trial its child run: the interrupted
    # trial's run continued, every epoch logged once (mlflow_history fails on a step logged twice)
    from mlflow import MlflowClient

    parent_id = json.loads((sweep_dir / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert len(runs) == 4 and set(children) == {errored, finished, interrupted}
    assert {r.info.status for r in runs} == {"FINISHED"}
    epochs = mlflow_history(client.tracking_uri, children[interrupted].info.run_id)["epoch"]
    assert sorted(epochs.values()) == [1, 2, 3]


@pytest.mark.e2e
def test_ctrl_c_stops_a_sweep_with_where_to_continue(ray_session, tmp_path, tiny_bert_dir):
    """SIGINT to the driver's process group, as a terminal sends Ctrl-C, once the trial trains:
    Tune saves the sweep's state, and the user reads one line on how to continue."""
    pipeline = sweep_pipeline(tmp_path, tiny_bert_dir, 200, {"search_space": {"optim.lr": {"grid": [1e-3]}},
                                                             "scheduler": {"name": "fifo"}})  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "tune", str(pipeline), "train.epochs=40", "--sweep-dir", str(sweep_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    with process_group(driver):
        deadline = time.time() + 300
        while not list((sweep_dir / "train").glob("*/checkpoint_manager_snapshot.json")):  # the trial's Ray Train run
            assert driver.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        out = ctrl_c(driver, timeout=120)
    assert driver.returncode == 130, out[-3000:]
    assert f"interrupted: the sweep stopped with 1 trial(s) unfinished; continue with: finetune tune --resume {sweep_dir}" \
        in " ".join(out.split()), out[-3000:]  # fmt: skip
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert list(_trial_states(sweep_dir).values()) not in ([], ["TERMINATED"])  # saved, and left to continue


def test_trial_slots_hold_trials_back_until_tune_ends_one(ray_session):
    import ray
    from types import SimpleNamespace

    from finetune.tuning.slots import ReleaseTrialSlot, create_slots

    slots = create_slots(1)
    try:
        assert ray.get(slots.acquire.remote("a", wait=False))
        assert ray.get(slots.acquire.remote("a", wait=False))  # a retried trial keeps its slot
        assert not ray.get(slots.acquire.remote("b", wait=False))
        waiting = slots.acquire.remote("b")
        assert not ray.wait([waiting], timeout=1.0)[0]
        # the driver's callback, as Tune calls it when it ends trial a (or when it errors)
        ReleaseTrialSlot().on_trial_complete(0, [], SimpleNamespace(trial_id="a"))
        assert ray.get(waiting, timeout=30) and ray.get(slots.held.remote()) == ["b"]
        ReleaseTrialSlot().on_trial_error(0, [], SimpleNamespace(trial_id="b"))
        deadline = time.time() + 30  # the callback does not wait for its release to land
        while ray.get(slots.held.remote()) and time.time() < deadline:
            time.sleep(0.1)
        assert ray.get(slots.held.remote()) == []
    finally:
        ray.kill(slots)


def test_workers_that_leave_ray_data_no_whole_cpu_are_warned_about(ray_session):
    from finetune.ray_env import data_cpus_warning

    assert data_cpus_warning(1.0) is None and data_cpus_warning(0.5) is None  # of 2 CPUs: 1 left
    # a sweep's 2 workers x 0.5 CPU plus the trial actor's 0.01: Ray Data's 1-CPU tasks never start
    assert "reserve 1.01 of the cluster's 2 CPUs" in data_cpus_warning(2 * 0.5 + 0.01)
    assert data_cpus_warning(3.0) is None  # more than the cluster has: an autoscaler's business
