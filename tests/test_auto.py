"""strategy.name: auto — the race's plan, its decisions, its explanation, `validate`, and one
race run for real: candidates as Ray Tune trials, the winner continued from its checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import tiny_sentiment_pipeline
from finetune.cli import main
from finetune.strategies.auto import AutoConfig, Candidate, epochs_needed, plan_race, promote
from finetune.tuning.race import Entry, Race, _explain, markdown


def auto(**fields) -> AutoConfig:
    return AutoConfig(name="auto", **fields)


@pytest.mark.parametrize("epochs, rungs, survivors", [(1, [1], [3]), (2, [1, 2], [5, 1]), (3, [1, 2, 3], [6, 2, 1]),
                                                      (10, [1, 3, 10], [10, 3, 1])])  # fmt: skip
def test_the_plan_fits_the_budget_in_full_fine_tune_epochs(epochs, rungs, survivors):
    plan = plan_race(auto(), "text", epochs=epochs, steps_per_epoch=40, groups=9)
    assert plan.rungs == rungs and plan.survivors == survivors
    assert plan.planned_epochs == epochs_needed(plan.rungs, plan.survivors) <= 3 * epochs
    # one more candidate would not have fitted
    assert not plan.left_out or epochs_needed(rungs, [survivors[0] + 1, *survivors[1:]]) > 3 * epochs
    assert plan.candidates[0].strategy["name"] == "linear_probe"  # the screen goes first


def test_candidates_follow_the_measured_priors_relative_to_the_pipelines_rate():
    plan = plan_race(auto(candidates=["full", "gradual_unfreeze", "lp_ft", "lora"], budget=4), "text",
                     epochs=3, steps_per_epoch=40, groups=8, full_lr=2e-5)  # fmt: skip
    by_id = {c.id: c for c in plan.candidates}
    assert list(by_id)[:5] == ["linear_probe-1", "full-1", "gradual_unfreeze-1", "lp_ft-1", "lora-1"]
    assert by_id["full-1"].lr == 2e-5 and by_id["linear_probe-1"].lr == 2e-3 and by_id["lora-1"].lr == 2e-4
    # the schedules that depend on the run's length follow the data: every group by mid-run
    assert by_id["gradual_unfreeze-1"].strategy["every_steps"] == 40 * 3 // (2 * 8)
    assert by_id["lp_ft-1"].strategy == {"name": "lp_ft", "probe_lr_scale": 100.0, "probe_steps": 20}
    # room left: second settings of the priors, best-measured strategies first
    assert by_id["full-2"].lr == 6e-6


def test_a_budget_too_small_for_two_candidates_is_refused():
    with pytest.raises(ValueError, match="raise strategy.budget to 1.5 or more"):
        plan_race(auto(budget=1.2), "image", epochs=2, steps_per_epoch=10, groups=8)


def test_promotion_keeps_the_best_and_drops_whatever_scores_below_the_probe():
    scores = {"linear_probe-1": 0.70, "full-1": 0.80, "lora-1": 0.65, "partial-1": 0.80}
    assert promote(scores, 2, "max", None) == ["full-1", "partial-1"]  # a tie: the earlier candidate first
    assert promote(scores, 4, "max", 0.70) == ["full-1", "partial-1", "linear_probe-1"]
    assert promote({"a": 0.3, "b": 0.2}, 1, "min", None) == ["b"]


def _entry(name: str, lr: float, trainable: int, scores: dict[int, float]) -> Entry:
    return Entry(Candidate(f"{name}-1", {"name": name}, lr), trainable, 1000, scores, [2.0], 900.0)


def test_the_explanation_names_the_margin_over_full_and_the_cheaper_runner_up():
    from finetune.strategies.auto import RacePlan

    entries = {e.candidate.id: e for e in [
        _entry("linear_probe", 1e-2, 10, {1: 0.70}),
        _entry("full", 1e-4, 1000, {1: 0.80}),
        _entry("partial", 1e-4, 700, {1: 0.83}),
        _entry("lora", 1e-3, 15, {1: 0.826}),
    ]}  # fmt: skip
    race = Race("val/accuracy", "max", RacePlan(list(e.candidate for e in entries.values()), [1, 3], [4, 1], 9.0),
                entries, {cid: cid for cid in entries}, "/tmp", winner="partial-1")  # fmt: skip
    _explain(race)
    assert race.margin_over_full == "3.0 points ahead of full (lr 0.0001) at epoch 1"
    assert race.cheaper_runner_up == "lora (lr 0.001): 0.4 points behind at epoch 1 with 1.5% of the weights training"
    text = markdown(race)
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| ") and "(lr" in line]
    assert rows == ["partial (lr 0.0001)", "lora (lr 0.001)", "full (lr 0.0001)", "linear_probe (lr 0.01)"]
    assert "trains on from its epoch-1 checkpoint to epoch 3" in text


@pytest.mark.parametrize("workers, cpus, total, fitted", [(1, 1.0, 2, 0.99), (2, 0.5, 2, 0.49), (1, 0.5, 2, None), (1, 1.0, 8, None),
                                                         (2, 1.0, 2, None), (2, 1.0, 3, 0.99)])  # fmt: skip
def test_candidates_leave_ray_data_a_cpu_beside_their_trial_actor(tmp_path, tiny_bert_dir, workers, cpus, total, fitted):
    from finetune.checks import load_pipeline
    from finetune.tuning.race import fitted_reservation

    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, scaling={"num_workers": workers, "cpus_per_worker": cpus})
    assert fitted_reservation(load_pipeline(pipeline), total) == fitted


def test_validate_shows_the_race_and_refuses_what_cannot_run(tmp_path, tiny_bert_dir, capsys):
    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir)
    assert main(["validate", str(pipeline), "strategy.name=auto", "strategy.candidates=[full,lora]"]) == 0
    out = capsys.readouterr().out
    assert "strategy race: linear_probe (lr 0.3), full (lr 0.003), lora (lr 0.03, r=8, alpha=16)" in out
    assert "rungs at epoch 1, 2, 3" in out
    assert main(["validate", str(pipeline), "strategy.name=auto", "strategy.budget=1"]) == 2
    assert "strategy.budget=1 leaves no room for a race of two candidates" in capsys.readouterr().out
    assert main(["validate", str(pipeline), "strategy.name=auto", "strategy.candidates=[full,sparse]"]) == 2
    assert "unknown strategies ['sparse']" in capsys.readouterr().out
    swept = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, name="swept", strategy={"name": "auto"},
                                    tune={"search_space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})  # fmt: skip
    assert main(["validate", str(swept)]) == 2
    assert "strategy.name=auto races strategies itself" in capsys.readouterr().out
    sweep = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, name="sweep",
                                    tune={"search_space": {"strategy.name": {"choice": ["full", "auto"]}}})  # fmt: skip
    assert main(["validate", str(sweep)]) == 2
    assert "auto races strategies itself and cannot be a trial's strategy" in capsys.readouterr().out


def test_advise_races_whatever_strategy_the_pipeline_names_with_the_auto_keys_given():
    from finetune.api import as_auto

    raw = {"strategy": {"name": "discriminative", "layer_decay": 0.8, "budget": 2, "candidates": ["full"]}}
    assert as_auto(raw)["strategy"] == {"name": "auto", "budget": 2, "candidates": ["full"]}
    assert as_auto({"strategy": {"name": "auto", "budget": 4}})["strategy"] == {"name": "auto", "budget": 4}
    assert as_auto({})["strategy"] == {"name": "auto"}


@pytest.mark.e2e
def test_auto_races_then_continues_the_winner_from_its_checkpoint(ray_session, tmp_path, tiny_bert_dir):
    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    overrides = ["strategy.name=auto", "strategy.candidates=[full]", "strategy.budget=1.5", "train.epochs=2",
                 "--run-dir", str(run_dir)]  # fmt: skip
    assert main(["train", str(pipeline), *overrides]) == 0
    race = json.loads((run_dir / "race.json").read_text())
    assert [c["id"] for c in race["candidates"]] == ["linear_probe-1", "full-1"]
    assert race["rungs"] == [1, 2] and race["candidate_epochs"] == 2  # each to the first rung, no further
    winner = next(c for c in race["candidates"] if c["id"] == race["winner"])
    loser = next(c for c in race["candidates"] if c["id"] != race["winner"])
    assert winner["outcome"] == "winner" and loser["outcome"] in ("out at epoch 1", "below the probe at epoch 1")
    assert all(set(c["scores"]) == {"1"} and c["trainable_params"] > 0 and c["peak_memory_mb"] > 0
               for c in race["candidates"])  # fmt: skip
    for candidate in race["candidates"]:  # each paused itself at the rung: one epoch, untested
        trial = (run_dir / "race" / "trials" / candidate["id"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line).get("epoch") for line in trial] == [0]
    # the run folder is the winner's run, continued from its race checkpoint to train.epochs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run"] == 2
    assert summary["strategy_race"]["winner"] == race["winner"]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((run_dir / "run.json").read_text())["storage_path"] == str(run_dir / "race" / "train")
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert best["strategy"]["name"] == winner["candidate"]["strategy"]["name"] == summary_strategy(run_dir)
    assert best["optim"]["lr"] == winner["candidate"]["lr"]
    assert (run_dir / "best").is_dir() and "Winner:" in (run_dir / "race.md").read_text()
    assert "How the strategy was chosen" in (run_dir / "report.html").read_text()


def summary_strategy(run_dir) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]["name"]
