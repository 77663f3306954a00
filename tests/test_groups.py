import pytest
import torchvision
from torch import nn

from finetune import models
from finetune.config import ModelConfig
from finetune.models.groups import UnknownArchitecture, layer_groups
from finetune.models.vision import ImageClassifier, replace_head


def covers_every_parameter_once(model, groups) -> bool:
    names = [name for group in groups for name in group.params]
    return sorted(names) == sorted(name for name, _ in model.named_parameters())


def test_bert_groups_run_embeddings_layers_pooler_head(tiny_bert_dir):
    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}"), num_labels=2)
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["stem", "bert.encoder.layer.0", "bert.encoder.layer.1", "neck", "head"]
    assert all(".embeddings." in name for name in groups[0].params)
    assert list(groups[-1].params) == ["hf_model.classifier.weight", "hf_model.classifier.bias"]
    assert covers_every_parameter_once(model, groups)


@pytest.mark.parametrize(
    ("arch", "first", "blocks", "head"),
    [
        ("resnet18", "stem", ["layer1", "layer2", "layer3", "layer4"], "net.fc.weight"),
        ("mobilenet_v3_small", "features.0", None, "net.classifier.3.weight"),
        ("efficientnet_b0", "features.0", None, "net.classifier.1.weight"),
        ("vit_b_16", "stem", None, "net.heads.head.weight"),
    ],
)
def test_torchvision_groups_in_input_to_output_order(arch, first, blocks, head):
    model = ImageClassifier(replace_head(torchvision.models.get_model(arch, weights=None), 3))
    groups = layer_groups(model)
    names = [g.name for g in groups]
    assert names[0] == first and names[-1] == "head"
    if blocks:
        assert names[1:-1] == blocks
    assert head in groups[-1].params and len(groups[-1].params) == 2  # the new Linear only
    assert covers_every_parameter_once(model, groups)
    if arch == "vit_b_16":
        assert {"net.class_token", "net.conv_proj.weight", "net.encoder.pos_embedding"} <= set(groups[0].params)
        assert names[1:13] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]


def test_efficientnet_lite0_groups():
    model = models.build_model(ModelConfig(name="efficientnet-lite0"), num_labels=10, image_size=64)
    groups = layer_groups(model)
    names = [g.name for g in groups]
    assert names == ["stem", *[f"_blocks.{i}" for i in range(16)], "neck", "head"]
    assert set(groups[0].params) == {"net._conv_stem.weight", "net._bn0.weight", "net._bn0.bias"}
    assert set(groups[-2].params) == {"net._conv_head.weight", "net._bn1.weight", "net._bn1.bias"}
    assert covers_every_parameter_once(model, groups)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnknownArchitecture, match="not a classifier built by finetune.models"):
        layer_groups(nn.Linear(3, 2))


class TwoConvNet(nn.Module):
    """No block sequence to find: its groups must be declared."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.conv1(x))).flatten(1))


def test_undetectable_blocks_say_how_to_declare_groups():
    model = ImageClassifier(replace_head(TwoConvNet(), 3))
    with pytest.raises(UnknownArchitecture, match=r"model.layer_groups: .*parameter names start net\.conv1\., net\.conv2\."):
        layer_groups(model)


def test_declared_groups_in_order_with_the_head_last():
    model = ImageClassifier(replace_head(TwoConvNet(), 3))
    groups = layer_groups(model, [r"^net\.conv1\.", r"^net\.conv2\."])
    assert [g.name for g in groups] == [r"^net\.conv1\.", r"^net\.conv2\.", "head"]
    assert set(groups[0].params) == {"net.conv1.weight", "net.conv1.bias"}
    assert set(groups[-1].params) == {"net.fc.weight", "net.fc.bias"}
    assert covers_every_parameter_once(model, groups)


def test_declared_groups_override_detection_first_match_wins(tiny_bert_dir):
    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}"), num_labels=2)
    groups = layer_groups(model, ["embeddings", r"layer\.0\.", "encoder|pooler"])
    assert [len(g.params) for g in groups[:2]] == [len(layer_groups(model)[0].params), 16]
    assert all("layer.0." not in name for name in groups[2].params)
    assert covers_every_parameter_once(model, groups)


@pytest.mark.parametrize(
    ("patterns", "message"),
    [(["embeddings"], "parameters match no group, e.g. hf_model.bert.encoder.layer.0"),
     (["embeddings", "encoder|pooler", "pooler"], r"\['pooler'\] match no parameter")],
)  # fmt: skip
def test_declared_groups_must_cover_and_all_match(tiny_bert_dir, patterns, message):
    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}"), num_labels=2)
    with pytest.raises(UnknownArchitecture, match=message):
        layer_groups(model, patterns)
