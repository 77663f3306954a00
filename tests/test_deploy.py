"""A run's model used elsewhere: best/ as a Hugging Face folder read by transformers alone, a run
directory moved to another place, the model card, `finetune export` (ONNX checked with
onnxruntime, torch.export, int8) and `finetune serve` (Ray Serve on 127.0.0.1)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

import finetune
from finetune import models
from finetune.cli import main
from finetune.config import ModelConfig
from finetune.data import TextPreprocessor
from finetune.inference import predict_with
from finetune.tasks.classification import Classification
from finetune.tasks.multi_label import MultiLabel
from finetune.tasks.regression import Regression
from helpers import tiny_sentiment_pipeline

PIPELINES = Path(__file__).parent.parent / "pipelines"
TEXTS = ["a really great film", "the plot was dull", "great acting but a dull and boring plot"]


@pytest.mark.parametrize("task", [Classification(["neg", "pos"]), MultiLabel(["funny", "sad", "long"], [0.3, 0.5, 0.7]),
                                  Regression(["stars"], mean=3.2, std=1.4)], ids=lambda task: task.type)  # fmt: skip
def test_a_saved_text_model_is_a_hugging_face_folder_transformers_reads_alone(tmp_path, tiny_bert_dir, task):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model_cfg = ModelConfig(name=f"hf:{tiny_bert_dir}")
    torch.manual_seed(0)
    model = models.build_model(model_cfg, num_labels=task.num_outputs).eval()
    best = models.save_model(model, tmp_path / "best", model_cfg, TextPreprocessor(str(tiny_bert_dir), 16), task)
    ours = predict_with(models.load_model(best), TEXTS)

    hf_model = AutoModelForSequenceClassification.from_pretrained(best)
    assert hf_model.config.problem_type == task.hf_problem_type
    assert hf_model.config.id2label == dict(enumerate(task.label_names))
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert tokenizer.model_max_length == 16  # truncation=True cuts where training did
    classifier = pipeline("text-classification", model=str(best), truncation=True)
    if task.type == "classification":
        answers = classifier(TEXTS, top_k=None)
        for answer, prediction in zip(answers, ours):
            assert answer[0]["label"] == prediction["label"]
            assert {a["label"]: a["score"] for a in answer} == pytest.approx(prediction["probabilities"], abs=1e-6)
    elif task.type == "multi_label":
        answers = classifier(TEXTS, top_k=None)  # sigmoid per label: the problem_type says so
        for answer, prediction in zip(answers, ours):
            probabilities = {a["label"]: a["score"] for a in answer}
            assert probabilities == pytest.approx(prediction["probabilities"], abs=1e-6)
            assert [n for n, t in zip(task.label_names, task.thresholds) if probabilities[n] >= t] == prediction["labels"]
    else:
        answers = classifier(TEXTS, function_to_apply="none")
        # the target's scaling is folded into the head: transformers reads stars, not standardised units
        assert [a["score"] for a in answers] == pytest.approx([p["value"] for p in ours], abs=1e-5)
        with torch.no_grad():
            standardised = model(**TextPreprocessor(str(tiny_bert_dir), 16).encode(TEXTS)).squeeze(-1)
        assert [p["value"] for p in ours] == pytest.approx((standardised * 1.4 + 3.2).tolist(), abs=1e-5)


def test_a_saved_model_names_nothing_of_the_machine_it_was_trained_on(tmp_path, tiny_bert_dir):
    model_cfg = ModelConfig(name=f"hf:{tiny_bert_dir}")
    model = models.build_model(model_cfg, num_labels=2).eval()
    best = models.save_model(model, tmp_path / "run" / "best", model_cfg, TextPreprocessor(str(tiny_bert_dir), 16),
                             Classification(["neg", "pos"]))  # fmt: skip
    for path in best.iterdir():
        if path.suffix in (".json", ".txt", ".md"):
            text = path.read_text()
            assert str(tiny_bert_dir) not in text and sys.prefix not in text and str(tmp_path) not in text, path.name
    moved = shutil.move(tmp_path / "run", tmp_path / "elsewhere")
    assert predict_with(models.load_model(moved / "best"), TEXTS)[0]["probabilities"].keys() == {"neg", "pos"}


def test_a_text_model_saved_before_best_was_a_hugging_face_folder_still_loads(tmp_path, tiny_bert_dir):
    """The earlier layout: the classifier's own weight names (hf_model.*), model.json naming where
    the model came from."""
    from safetensors.torch import save_model as save_weights
    from transformers import AutoTokenizer

    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}"), num_labels=2).eval()
    old = tmp_path / "best"
    old.mkdir()
    save_weights(model, str(old / "model.safetensors"))
    model.hf_model.config.save_pretrained(old)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(old)
    for name, content in {"model.json": {"name": f"hf:{tiny_bert_dir}", "family": "hf", "target": str(tiny_bert_dir),
                                         "num_labels": 2, "image_size": 224},
                          "labels.json": ["neg", "pos"], "task.json": {"type": "classification"},
                          "preprocessing.json": {"kind": "text", "max_length": 16}}.items():  # fmt: skip
        (old / name).write_text(json.dumps(content))
    saved = models.load_model(old)
    inputs = saved.preprocessor.encode(TEXTS)
    with torch.no_grad():
        assert torch.equal(saved.model(**inputs), model(**inputs))


def test_export_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "torchscript"]) == 2
    assert "use --format pt2" in capsys.readouterr().out
    assert main(["export", str(tmp_path), "--format", "pt2", "--quantize", "int8"]) == 2
    assert "add --format onnx" in capsys.readouterr().out
    assert main(["export", str(tmp_path), "--format", "tflite"]) == 2
    assert "use one of onnx, pt2, hf" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nothing-here")]) == 2
    assert "not a finished run directory" in capsys.readouterr().out


def test_serve_refuses_a_taken_port_and_a_missing_run_in_one_line(tmp_path, tiny_bert_dir, capsys):
    """Before Ray or Serve start: exit 2 and the line that says what to change."""
    import socket

    from finetune import config as config_module

    cfg = config_module.parse({"name": "tiny", "data": {"source": "rotten_tomatoes", "max_length": 16},
                               "model": {"name": f"hf:{tiny_bert_dir}"}})  # fmt: skip
    run_dir = tmp_path / "run"
    models.save_model(models.build_model(cfg.model, num_labels=2), run_dir / "best", cfg.model,
                      TextPreprocessor(str(tiny_bert_dir), 16), Classification(["neg", "pos"]))  # fmt: skip
    config_module.save(cfg, run_dir / "config.yaml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    assert f"127.0.0.1:{port} is not free" in capsys.readouterr().out
    assert main(["serve", str(tmp_path / "no-run"), "--port", str(port)]) == 2
    assert "not a finished run directory" in capsys.readouterr().out


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def moved_run(ray_session, tmp_path_factory, tiny_bert_dir):
    """One real run (tiny BERT, 2 epochs), copied to another folder as `cp -a` would, the original
    deleted: (its run directory, its summary)."""
    tmp_path = tmp_path_factory.mktemp("deploy")
    pipeline = tiny_sentiment_pipeline(tmp_path, tiny_bert_dir, rows=400, train={"epochs": 2})
    assert main(["train", str(pipeline), "--run-dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    run_dir = shutil.copytree(tmp_path / "run", tmp_path / "moved" / "run", symlinks=True)
    shutil.rmtree(tmp_path / "run")
    return run_dir, summary


@pytest.mark.e2e
def test_a_moved_run_predicts_evaluates_and_carries_a_model_card(moved_run, capsys):
    run_dir, summary = moved_run
    capsys.readouterr()
    assert main(["predict", str(run_dir), *TEXTS]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == [p["label"] for p in finetune.load(run_dir).predict(TEXTS)] and set(printed) <= {"neg", "pos"}
    assert main(["evaluate", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["test/accuracy"] == pytest.approx(summary["test_accuracy"])

    card = (run_dir / "best" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    tested = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert tested["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert "## Intended use and limits" in card and "finetune train config.yaml" in card and "reviews.csv" in card
    assert f"| accuracy | {summary['test_accuracy']:.4f} | {summary['baseline_test_accuracy']:.4f} |" in card
    assert str(run_dir.parent.parent) not in card  # no folder of the training machine


@pytest.mark.e2e
def test_exports_check_out_on_the_runs_test_rows(moved_run, tmp_path, capsys):
    """ONNX (+ int8), pt2 and hf, each checked by `finetune export` itself, then used as their users
    use them: onnxruntime, torch.export.load, transformers' pipeline."""
    run_dir, summary = moved_run
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "onnx", "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "int8:" in printed and "accuracy" in printed
    manifest = json.loads((run_dir / "export" / "onnx" / "export.json").read_text())
    assert manifest["check"]["rows"] == summary["test_samples"] and manifest["check"]["max_abs_diff"] <= 1e-4
    assert manifest["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    assert abs(manifest["int8"]["int8"]["metrics"]["test/accuracy"] - summary["test_accuracy"]) <= 0.05
    assert manifest["int8"]["int8"]["bytes"] < manifest["int8"]["fp32"]["bytes"]
    assert (run_dir / "export" / "onnx" / "README.md").is_file() and (run_dir / "export" / "onnx" / "tokenizer.json").is_file()

    import onnxruntime
    from transformers import AutoTokenizer

    session = onnxruntime.InferenceSession(str(run_dir / "export" / "onnx" / "model.onnx"))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export" / "onnx")
    for batch in (TEXTS[:1], TEXTS):  # one row and several of different lengths: the axes are dynamic
        encoded = tokenizer(batch, padding=True, truncation=True, return_tensors="np")
        logits = session.run(None, {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})[0]
        assert logits.shape == (len(batch), 2)

    for format in ("pt2", "hf"):
        assert main(["export", str(run_dir), "--format", format, "--out", str(tmp_path / format)]) == 0
        assert json.loads((tmp_path / format / "export.json").read_text())["check"]["max_abs_diff"] <= 1e-4
    program = torch.export.load(tmp_path / "pt2" / "model.pt2").module()
    encoded = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert program(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).shape == (3, 2)
    from transformers import pipeline as hf_pipeline

    answers = hf_pipeline("text-classification", model=str(tmp_path / "hf"), truncation=True)(TEXTS[:2])
    assert [a["label"] for a in answers] == [p["label"] for p in finetune.load(run_dir).predict(TEXTS[:2])]


@pytest.mark.e2e
def test_serve_answers_concurrent_requests_as_predict_does(moved_run, capsys):
    """Ray Serve on 127.0.0.1, two replicas, batching: 24 clients at once get what `finetune
    predict` prints; a bad request gets a 4xx naming the fix."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from finetune import serving

    run_dir, _ = moved_run
    capsys.readouterr()
    assert main(["predict", str(run_dir), *TEXTS]) == 0
    expected = capsys.readouterr().out.splitlines()
    url = finetune.serve(run_dir, port=free_port(), replicas=2, max_batch_size=8, batch_wait_s=0.02,
                         cpus_per_replica=0.25, blocking=False)  # fmt: skip
    try:
        assert url.startswith("http://127.0.0.1:")
        health = requests.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["labels"] == ["neg", "pos"]

        def ask(i: int) -> list[dict]:
            texts = [TEXTS[i % 3], TEXTS[(i + 1) % 3]]
            response = requests.post(f"{url}/predict", json={"inputs": texts}, timeout=60)
            assert response.status_code == 200, response.text
            return [(text, p) for text, p in zip(texts, response.json()["predictions"])]

        with ThreadPoolExecutor(24) as pool:
            answers = [pair for pairs in pool.map(ask, range(24)) for pair in pairs]
        printed = dict(zip(TEXTS, expected))
        for text, prediction in answers:
            label, probability = printed[text].split()[:2]  # the terminal expands the tab
            assert prediction["input"] == text and prediction["label"] == label
            assert prediction["probability"] == pytest.approx(float(probability), abs=1e-3)

        for body, status, says in [
            (b"not json", 400, "not JSON"),
            (b'{"texts": ["x"]}', 400, '"inputs"'),
            (b'{"inputs": [3]}', 400, "non-empty strings"),
            (json.dumps({"inputs": ["x"] * 300}).encode(), 400, "split it"),
        ]:  # fmt: skip
            response = requests.post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"}, timeout=30)
            assert response.status_code == status and says in response.json()["error"], response.text
        assert requests.get(f"{url}/predict", timeout=30).status_code == 405
        assert requests.get(f"{url}/nothing", timeout=30).status_code == 404
    finally:
        serving.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_an_image_model_exports_to_onnx_and_serves_base64_and_paths(ray_session, tmp_path, capsys):
    """EfficientNet-Lite0 (its packaged ImageNet weights, a new head) saved as a run over a folder of
    Fashion-MNIST PNGs: the ONNX export is checked on the run's rows, its folder says how to
    preprocess, and the endpoint answers an image sent as base64 or named under --image-root as
    `finetune predict` does."""
    import base64
    import runpy

    import requests

    from finetune import config as config_module
    from finetune import serving

    photos = tmp_path / "photos"
    runpy.run_path(str(PIPELINES / "make_fashion_folder.py"))["main"]([str(photos), "--train-images", "40",
                                                                       "--test-images", "12", "--classes", "3"])  # fmt: skip
    cfg = config_module.parse({"name": "shirts", "model": {"name": "efficientnet-lite0"},
                               "data": {"source": str(photos / "train"), "test_source": str(photos / "test"),
                                        "image_size": 64}})  # fmt: skip
    run_dir = tmp_path / "run"
    model = models.build_model(cfg.model, num_labels=3, image_size=64).eval()
    labels = sorted(p.name for p in (photos / "train").iterdir())
    models.save_model(model, run_dir / "best", cfg.model, models.build_preprocessor(cfg.model, cfg.data),
                      Classification(labels), image_size=64)  # fmt: skip
    config_module.save(cfg, run_dir / "config.yaml")

    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    manifest = json.loads((run_dir / "export" / "onnx" / "export.json").read_text())
    assert manifest["inputs"]["pixel_values"]["shape"] == ["batch", 3, 64, 64] and manifest["check"]["max_abs_diff"] <= 1e-4
    preprocessing = json.loads((run_dir / "export" / "onnx" / "preprocessing.json").read_text())
    assert preprocessing["size"] == 64 and len(preprocessing["mean"]) == len(preprocessing["std"]) == 3

    image = next((photos / "test" / labels[0]).iterdir())
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(image)]) == 0
    label, probability = capsys.readouterr().out.split()[:2]
    url = finetune.serve(run_dir, port=free_port(), cpus_per_replica=0.25, image_root=photos, blocking=False)
    try:
        encoded = base64.b64encode(image.read_bytes()).decode()
        relative = str(image.relative_to(photos))
        response = requests.post(f"{url}/predict", json={"inputs": [{"base64": encoded}, relative]}, timeout=60)
        assert response.status_code == 200, response.text
        for prediction in response.json()["predictions"]:
            assert prediction["label"] == label and prediction["probability"] == pytest.approx(float(probability), abs=1e-3)
        for inputs, status, says in [([{"base64": "not base64!"}], 400, "does not decode"),
                                     (["../../etc/passwd"], 400, "not an image file under"),
                                     ([{"base64": base64.b64encode(b"not a picture").decode()}], 422, "unreadable image")]:  # fmt: skip
            response = requests.post(f"{url}/predict", json={"inputs": inputs}, timeout=60)
            assert response.status_code == status and says in response.json()["error"], response.text
    finally:
        serving.stop()
