"""Each strategy's defining property, on a tiny real BERT trained for real steps."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import pipeline_config, run_epochs, sentiment_rows, two_worker_pipeline
from finetune import config, models
from finetune.cli import main
from finetune.config import DataConfig, ModelConfig
from finetune.data import TextPreprocessor
from finetune.models.groups import layer_groups
from finetune.strategies import build_strategy
from finetune.training.setup import build_training
from finetune.tasks.classification import Classification

LR = 1e-2


def strategy_cfg(**section):
    return pipeline_config(strategy=section).strategy


@pytest.fixture
def tiny(tiny_bert_dir):
    torch.manual_seed(0)
    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}"), num_labels=2)
    rows = sentiment_rows(64)
    preprocessor = TextPreprocessor(str(tiny_bert_dir), 16)
    encoded = preprocessor.encode([r["review"] for r in rows])
    labels = torch.tensor([int(r["sentiment"] == "pos") for r in rows])
    batches = [
        {"input_ids": encoded["input_ids"][i : i + 16], "attention_mask": encoded["attention_mask"][i : i + 16],
         "label": labels[i : i + 16]}
        for i in range(0, 64, 16)
    ]  # fmt: skip
    return model, batches


def train(model, batches, strategy: dict, epochs=1, grad_accum_steps=1):
    """Real optimizer steps through the run's own setup chain (training.setup.build_training);
    returns the Training (groups, strategy, optimizer), the parameters that moved and the
    trainable set before each optimizer step."""
    cfg = pipeline_config(strategy=strategy, optim={"lr": LR}, schedule={"name": "constant", "warmup_ratio": 0.0},
                          train={"epochs": epochs})  # fmt: skip
    training = build_training(cfg, model, steps_per_epoch=len(batches) // grad_accum_steps)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable_by_step = run_epochs(training, batches, epochs, grad_accum_steps)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return training, moved, trainable_by_step


def all_names(model):
    return {n for n, _ in model.named_parameters()}


def test_full_trains_everything(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "full"})
    assert moved == all_names(model)
    assert {g["lr"] for g in training.optimizer.param_groups} == {LR}


def test_linear_probe_trains_only_the_head(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "linear_probe"})
    assert moved == set(training.groups[-1].params) == {"hf_model.classifier.weight", "hf_model.classifier.bias"}
    # the head alone, its weight decayed and its bias not (optim.no_decay)
    assert [(g["name"], g["weight_decay"]) for g in training.optimizer.param_groups] == [("head", 0.01), ("head", 0.0)]


def test_partial_freezes_the_first_groups(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "partial", "freeze_groups": 2})
    frozen = set(training.groups[0].params) | set(training.groups[1].params)
    assert moved == all_names(model) - frozen


def test_partial_freezes_by_regex(tiny):
    model, batches = tiny
    _, moved, _ = train(model, batches, {"name": "partial", "freeze_regex": r"\.attention\."})
    assert moved and not any(".attention." in n for n in moved)
    assert all(".attention." in n for n in all_names(model) - moved)


def test_partial_refuses_to_freeze_the_head(tiny):
    model, _ = tiny
    strategy = build_strategy(strategy_cfg(name="partial", freeze_groups=5))
    with pytest.raises(ValueError, match="this model has 5 layer groups"):
        strategy.setup(model, layer_groups(model), LR)


def test_bitfit_trains_biases_and_head(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "bitfit"})
    assert moved == {n for n in all_names(model) if n.endswith("bias")} | set(training.groups[-1].params)


def test_discriminative_rates_decay_from_the_head(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "discriminative", "layer_decay": 0.5})
    lrs = {g["name"]: g["lr"] for g in training.optimizer.param_groups}
    names = [g.name for g in training.groups]
    assert lrs == {name: LR * 0.5 ** (len(names) - 1 - i) for i, name in enumerate(names)}
    assert moved == all_names(model)


def test_gradual_unfreezing_follows_the_schedule(tiny):
    model, batches = tiny  # 4 batches: 4 optimizer steps per epoch
    training, moved, trainable = train(model, batches, {"name": "gradual_unfreeze", "every_epochs": 2}, epochs=4)
    groups = training.groups
    top = lambda k: {n for g in groups[-k:] for n in g.params}  # noqa: E731
    assert trainable == [top(1)] * 8 + [top(2)] * 8
    assert moved == top(2)  # groups below were never unfrozen: bit-identical


def test_gradual_unfreezing_by_steps_counts_optimizer_steps(tiny):
    model, batches = tiny  # 4 batches, 2 per optimizer step: 2 steps per epoch
    training, moved, trainable = train(model, batches, {"name": "gradual_unfreeze", "every_steps": 3}, epochs=3,
                                       grad_accum_steps=2)  # fmt: skip
    groups = training.groups
    top = lambda k: {n for g in groups[-k:] for n in g.params}  # noqa: E731
    assert trainable == [top(1), top(1), top(1), top(2), top(2), top(2)]
    assert moved == top(2)


def test_gradual_resumes_mid_schedule(tiny):
    model, _ = tiny
    groups = layer_groups(model)
    by_epochs = build_strategy(strategy_cfg(name="gradual_unfreeze", every_epochs=1))
    by_epochs.setup(model, groups, LR)
    by_epochs.before_step(3, 120, model)  # a run resumed at epoch 3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for g in groups[-4:] for n in g.params}
    by_steps = build_strategy(strategy_cfg(name="gradual_unfreeze", every_steps=50))
    by_steps.setup(model, groups, LR)
    by_steps.before_step(3, 120, model)  # global step 120: two periods done
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for g in groups[-3:] for n in g.params}


def test_gradual_and_lp_ft_take_one_period(tiny):
    with pytest.raises(config.ConfigError, match="every_epochs and strategy.every_steps"):
        strategy_cfg(name="gradual_unfreeze", every_epochs=1, every_steps=10)
    with pytest.raises(config.ConfigError, match="probe_epochs and strategy.probe_steps: set at most one"):
        strategy_cfg(name="lp_ft", probe_epochs=1, probe_steps=10)
    assert strategy_cfg(name="lp_ft").probe_epochs == 1


def lp_ft_run(model, batches, strategy: dict, epochs: int, grad_accum_steps: int = 1, schedule: dict | None = None,
              run_epochs_count: int | None = None):  # fmt: skip
    """lp_ft through the run's setup chain (a run of `epochs`, the first `run_epochs_count` of them
    taken); the trainable set and each group's rate at every step."""
    cfg = pipeline_config(strategy=strategy, optim={"lr": LR}, train={"epochs": epochs},
                          schedule=schedule or {"name": "constant", "warmup_ratio": 0.0})  # fmt: skip
    training = build_training(cfg, model, steps_per_epoch=len(batches) // grad_accum_steps)
    rates: list[dict[str, float]] = []
    hook = training.strategy.before_step

    def before_step(epoch, step, module):
        hook(epoch, step, module)
        rates.append({g["name"]: g["lr"] for g in training.optimizer.param_groups})

    training.strategy.before_step = before_step
    trainable = run_epochs(training, batches, run_epochs_count or epochs, grad_accum_steps)
    return training, trainable, rates


def test_lp_ft_probes_the_head_then_trains_everything_at_the_lower_rate(tiny):
    model, batches = tiny  # 4 optimizer steps per epoch
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    training, trainable, rates = lp_ft_run(model, batches, {"name": "lp_ft", "probe_lr_scale": 10.0}, epochs=2)
    head, names = set(training.groups[-1].params), [g.name for g in training.groups]
    assert trainable == [head] * 4 + [all_names(model)] * 4
    assert rates == [{**dict.fromkeys(names, LR), "head": LR * 10}] * 4 + [dict.fromkeys(names, LR)] * 4
    training.strategy.before_step(0, 0, training.module)  # as the run starts: what its group table shows
    assert [(row["group"], row["lr"], row["trainable_now"] > 0) for row in training.describe_groups()] == [
        *((name, LR, False) for name in names[:-1]), ("head", LR * 10, True)]  # fmt: skip
    assert {n for n, p in model.named_parameters() if not torch.equal(p, pretrained[n])} == all_names(model)


def test_lp_ft_probe_alone_leaves_the_body_pretrained(tiny):
    model, batches = tiny
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    training, _, _ = lp_ft_run(model, batches, {"name": "lp_ft", "probe_epochs": 1}, epochs=1)
    assert {n for n, p in model.named_parameters() if not torch.equal(p, pretrained[n])} == set(training.groups[-1].params)


def test_lp_ft_counts_probe_steps_in_optimizer_steps(tiny):
    model, batches = tiny  # 4 batches, 2 per optimizer step: 2 steps per epoch
    training, trainable, rates = lp_ft_run(model, batches, {"name": "lp_ft", "probe_steps": 3}, epochs=3,
                                           grad_accum_steps=2)  # fmt: skip
    head = set(training.groups[-1].params)
    assert trainable == [head] * 3 + [all_names(model)] * 3
    assert [r["head"] for r in rates] == [LR * 10] * 3 + [LR] * 3


def test_lp_ft_scales_on_top_of_the_schedule_and_resumes_mid_schedule(tiny):
    model, batches = tiny
    strategy = {"name": "lp_ft", "probe_steps": 6, "probe_lr_scale": 100.0}
    schedule = {"name": "linear", "warmup_ratio": 0.25}  # 8 steps: 2 of warmup, then down to 0
    training, _, rates = lp_ft_run(model, batches, strategy, epochs=2, schedule=schedule)
    factor = [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert [r["head"] for r in rates] == pytest.approx([LR * f * (100 if i < 6 else 1) for i, f in enumerate(factor)])
    assert [r["stem"] for r in rates] == pytest.approx([LR * f for f in factor])
    # a run resumed after its first epoch (step 4, inside the probe) from its checkpointed state
    saved = lp_ft_run(model, batches, strategy, epochs=2, schedule=schedule, run_epochs_count=1)[0]
    state = {"optimizer": saved.optimizer.state_dict(), "scheduler": saved.scheduler.state_dict()}
    cfg = pipeline_config(strategy=strategy, optim={"lr": LR}, train={"epochs": 2}, schedule=schedule)
    again = build_training(cfg, model, steps_per_epoch=4)
    again.optimizer.load_state_dict(state["optimizer"])
    again.scheduler.load_state_dict(state["scheduler"])
    again.strategy.before_step(1, 4, model)
    lrs = {g["name"]: g["lr"] for g in again.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(LR * 4 / 6 * 100) and lrs["stem"] == pytest.approx(LR * 4 / 6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(again.groups[-1].params)
    again.strategy.before_step(1, 6, model)  # the probe's end
    assert {n for n, p in model.named_parameters() if p.requires_grad} == all_names(model)


def test_lp_ft_multipliers_do_not_compound_with_a_plateau_schedule(tiny):
    model, batches = tiny
    cfg = pipeline_config(strategy={"name": "lp_ft"}, optim={"lr": LR}, train={"epochs": 2},
                          schedule={"name": "plateau", "warmup_ratio": 0.0, "patience": 0, "gamma": 0.5})  # fmt: skip
    training = build_training(cfg, model, steps_per_epoch=4)
    rates = lambda: {g["name"]: g["lr"] for g in training.optimizer.param_groups}  # noqa: E731
    training.scheduler.epoch_end(0.5)
    training.scheduler.epoch_end(0.4)  # worse, patience 0: the plateau halves its own rate, once
    assert rates()["stem"] == pytest.approx(LR * 0.5) and rates()["head"] == pytest.approx(LR * 0.5 * 10)
    for _ in range(4):
        training.scheduler.step()
    assert rates()["stem"] == rates()["head"] == pytest.approx(LR * 0.5)  # epoch 1: the probe is over


def test_surgical_trains_the_named_groups_and_the_head(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "surgical", "groups": ["bert.encoder.layer.0"]})
    groups = {g.name: set(g.params) for g in training.groups}
    assert moved == groups["bert.encoder.layer.0"] | groups["head"]


@pytest.mark.parametrize(("rule", "chosen"), [({"first": 2}, ["stem", "bert.encoder.layer.0"]),
                                              ({"last": 1}, ["neck"])])  # fmt: skip
def test_surgical_first_or_last_groups(tiny, rule, chosen):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "surgical", **rule})
    groups = {g.name: set(g.params) for g in training.groups}
    assert moved == set().union(*(groups[name] for name in [*chosen, "head"]))


def test_surgical_names_the_groups_it_does_not_know(tiny):
    model, _ = tiny
    strategy = build_strategy(strategy_cfg(name="surgical", groups=["block.0"]))
    with pytest.raises(ValueError, match=r"'block.0' is not a layer group of this model; its groups below the head "
                                         r"are stem, bert.encoder.layer.0, bert.encoder.layer.1, neck"):
        strategy.setup(model, layer_groups(model), LR)
    with pytest.raises(ValueError, match="this model has 4 layer groups below the head"):
        build_strategy(strategy_cfg(name="surgical", last=5)).setup(model, layer_groups(model), LR)
    with pytest.raises(config.ConfigError, match="set exactly one of them"):
        strategy_cfg(name="surgical", first=1, last=1)


def test_l2sp_penalty_and_gradient_equal_the_formula(tiny):
    model, _ = tiny
    strategy = build_strategy(strategy_cfg(name="l2sp", alpha=0.3, beta=0.7))
    groups = layer_groups(model)
    param_groups = strategy.setup(model, groups, LR)
    assert {g["weight_decay"] for g in param_groups} == {0.0}
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    head = set(groups[-1].params)
    params = dict(model.named_parameters())
    expected = sum(
        0.7 / 2 * (p**2).sum() if n in head else 0.3 / 2 * ((p - pretrained[n]) ** 2).sum() for n, p in params.items()
    )
    penalty = strategy.penalty(model)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    penalty.backward()
    for n, p in params.items():
        want = 0.7 * p if n in head else 0.3 * (p - pretrained[n])
        torch.testing.assert_close(p.grad, want.detach())


@pytest.mark.parametrize("scheme", ["zeros", "normal", "xavier", "kaiming"])
def test_head_init_schemes(tiny_bert_dir, scheme):
    torch.manual_seed(0)
    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}", head_init=scheme), num_labels=2)
    weight, bias = model.hf_model.classifier.weight, model.hf_model.classifier.bias
    assert torch.count_nonzero(bias) == 0
    if scheme == "zeros":
        assert torch.count_nonzero(weight) == 0
    elif scheme == "normal":
        assert 0.01 < weight.std().item() < 0.03
    else:
        fan_in, fan_out = weight.shape[1], weight.shape[0]
        std = (2 / (fan_in + fan_out)) ** 0.5 if scheme == "xavier" else (1 / fan_in) ** 0.5
        assert 0.5 * std < weight.std().item() < 1.5 * std


@pytest.mark.e2e
def test_gradual_unfreeze_under_ddp_with_two_workers(ray_session, tmp_path, tiny_bert_dir):
    """Parameters that join training later are synchronised by DDP; groups never unfrozen stay pretrained."""

    pipeline = two_worker_pipeline(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    overrides = ["strategy.name=gradual_unfreeze", "train.epochs=2", "model.head_init=zeros", "--run-dir", str(run_dir)]
    assert main(["train", str(pipeline), *overrides]) == 0
    saved = load_file(run_dir / "best" / "model.safetensors")
    pretrained = load_file(tiny_bert_dir / "model.safetensors")
    # epoch 0 trains the head, epoch 1 head + neck (the pooler); the layers and embeddings never train
    for name, tensor in pretrained.items():
        ours = saved.get(name)  # best/ is a Hugging Face folder: the library's own names
        if ours is not None and ("encoder.layer" in name or "embeddings" in name):
            assert torch.equal(ours, tensor), name
    assert not torch.equal(saved["bert.pooler.dense.weight"], pretrained["bert.pooler.dense.weight"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_samples"] == summary["baseline_test_samples"] == 80  # every test row, once
    # two epochs of head and pooler over a frozen random body may learn nothing: the run says so when it does not
    no_better = summary["test_accuracy"] <= summary["constant_test_accuracy"] + 0.02
    assert no_better == any("no better than always predicting the most common class" in w for w in summary["warnings"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]["name"] == "gradual_unfreeze"


@pytest.mark.e2e
def test_lp_ft_under_ddp_with_accumulation(ray_session, tmp_path, tiny_bert_dir):
    """Two workers, two micro-batches per step: the body joins training after the probe epoch, and
    DDP (which must expect parameters without gradients during the probe) synchronises it."""
    pipeline = two_worker_pipeline(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    overrides = ["strategy.name=lp_ft", "strategy.probe_epochs=1", "train.epochs=2", "train.grad_accum_steps=2",
                 "checkpoint.num_to_keep=2", "--run-dir", str(run_dir)]  # both epochs' checkpoints  # fmt: skip
    assert main(["train", str(pipeline), *overrides]) == 0
    pretrained = load_file(tiny_bert_dir / "model.safetensors")
    probed, tuned = (load_file(path) for path in sorted(run_dir.glob("ray/*/checkpoint_*/model.safetensors")))
    body = [name for name in pretrained if "encoder.layer" in name or "embeddings" in name]
    assert all(torch.equal(probed[name], pretrained[name]) for name in body)  # epoch 0: the head alone
    assert not torch.equal(probed["classifier.weight"], tuned["classifier.weight"])
    assert all(not torch.equal(tuned[name], pretrained[name]) for name in body if name.endswith("weight")
               and "LayerNorm" not in name)  # epoch 1: everything  # fmt: skip
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]["probe_epochs"] == 1


def test_lora_trains_only_adapters_and_head(tiny):
    model, batches = tiny
    training, moved, _ = train(model, batches, {"name": "lora", "r": 4})  # the chain adapts the model first
    assert any("lora_" in n for n in moved)
    assert moved == {n for n in all_names(model) if "lora_B" in n or "lora_A" in n} | set(training.groups[-1].params)
    # every adapted weight is still the pretrained one; the update lives in the adapters
    assert not any(n.endswith("base_layer.weight") for n in moved)


def test_lora_merges_into_plain_weights_on_export(tiny, tmp_path, tiny_bert_dir):
    model, batches = tiny
    train(model, batches, {"name": "lora", "r": 4, "target_modules": ["query", "value"]})
    model.eval()
    preprocessor = TextPreprocessor(str(tiny_bert_dir), 16)
    models.save_model(model, tmp_path / "saved", ModelConfig(name=f"hf:{tiny_bert_dir}"), preprocessor, Classification(["neg", "pos"]))
    saved = models.load_model(tmp_path / "saved")
    assert not any("lora" in n for n, _ in saved.model.named_parameters())
    inputs = preprocessor.encode(["a great film", "dull and boring"])
    with torch.no_grad():
        torch.testing.assert_close(saved.model(**inputs), model(**inputs), rtol=1e-4, atol=1e-5)


def test_lora_on_a_vision_model_adapts_convolutions(tmp_path):
    model = models.build_model(ModelConfig(name="torchvision:resnet18", weights="none"), num_labels=3)
    strategy = build_strategy(strategy_cfg(name="lora", r=2))
    strategy.adapt(model)
    groups = layer_groups(model)
    strategy.setup(model, groups, LR)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("layer4.1.conv2.lora_A" in n for n in trainable)
    assert trainable - set(groups[-1].params) == {n for n in trainable if "lora_" in n}
    assert groups[-1].name == "head" and set(groups[-1].params) == {"net.fc.weight", "net.fc.bias"}
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_lora_on_efficientnet_lite_adapts_pointwise_convs_and_merges(tmp_path):
    torch.manual_seed(0)
    model = models.build_model(ModelConfig(name="efficientnet-lite0"), num_labels=3, image_size=32)
    pixels = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(pixel_values=pixels)
    strategy = build_strategy(strategy_cfg(name="lora", r=2))
    strategy.adapt(model)
    with torch.no_grad():  # adapters start at zero (lora_B = 0): same function
        torch.testing.assert_close(model(pixel_values=pixels), before)
    groups = layer_groups(model)
    strategy.setup(model, groups, LR)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, p in model.named_parameters() if ".lora_A" in n}
    assert "net._blocks.0._project_conv" in adapted and "net._conv_head" in adapted
    assert "net._conv_stem" not in adapted  # 3x3 'same' padding: left alone
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # as if trained
        adapted_out = model(pixel_values=pixels)
    assert not torch.allclose(adapted_out, before)
    preprocessor = models.build_preprocessor(ModelConfig(name="efficientnet-lite0"), DataConfig(source="x", image_size=32))
    models.save_model(model, tmp_path, ModelConfig(name="efficientnet-lite0"), preprocessor, Classification(["a", "b", "c"]), 32)
    saved = models.load_model(tmp_path)  # the original static-padding classes, merged weights
    with torch.no_grad():
        torch.testing.assert_close(saved.model(pixel_values=pixels), adapted_out, rtol=1e-4, atol=1e-4)


def test_lora_explains_models_it_cannot_adapt():
    from finetune.models.vision import ImageClassifier

    model = ImageClassifier(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="Sequential has no plain Linear or Conv2d layer outside its head"):
        build_strategy(strategy_cfg(name="lora")).adapt(model)


@pytest.mark.e2e
def test_lora_under_ddp_exports_a_merged_model(ray_session, tmp_path, tiny_bert_dir, capsys):

    pipeline = two_worker_pipeline(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    overrides = ["strategy.name=lora", "strategy.r=4", "train.epochs=2", "--run-dir", str(run_dir)]
    assert main(["train", str(pipeline), *overrides]) == 0
    assert not any("lora" in key for key in load_file(run_dir / "best" / "model.safetensors"))
    summary = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["test/accuracy"] == pytest.approx(summary["test_accuracy"])
