"""Per-image transforms with torchvision.transforms.v2: the resize every split gets, plus the
training augmentation listed in `data.augment`; and batch-level mixup/cutmix for the loop.

random_resized_crop takes the place of the resize (it produces the final size) and
random_erasing acts on the normalised tensor, as in the papers; the rest keep list order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# torchvision is imported where a transform is built: with it comes torch._dynamo, over a
# second of imports in every Ray process of a text pipeline, which has no use for it.
if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2


def _transform(spec: dict) -> v2.Transform:
    from torchvision.transforms import v2

    name = spec["name"]
    if name == "horizontal_flip":
        return v2.RandomHorizontalFlip(spec["p"])
    if name == "rotation":
        return v2.RandomRotation(spec["degrees"])
    if name == "color_jitter":
        return v2.ColorJitter(spec["brightness"], spec["contrast"], spec["saturation"], spec["hue"])
    if name == "rand_augment":
        return v2.RandAugment(num_ops=spec["num_ops"], magnitude=spec["magnitude"])
    if name == "trivial_augment":
        return v2.TrivialAugmentWide()
    raise ValueError(f"data.augment: unknown transform {name!r}")


class ImageTransforms:
    """`to_size(picture)`: PIL image at `size`, augmented when `specs` say so; `erase(tensor)`."""

    def __init__(self, size: int, specs: tuple[dict, ...] = ()):
        from torchvision.transforms import v2

        crop = next((s for s in specs if s["name"] == "random_resized_crop"), None)
        resize = (
            v2.RandomResizedCrop(size, scale=tuple(crop["scale"]), ratio=tuple(crop["ratio"]))
            if crop
            else v2.Resize((size, size))
        )
        middle = [_transform(s) for s in specs if s["name"] not in ("random_resized_crop", "random_erasing")]
        self.to_size = v2.Compose([resize, *middle])
        erasing = [v2.RandomErasing(p=s["p"], scale=tuple(s["scale"])) for s in specs if s["name"] == "random_erasing"]
        self.erase = v2.Compose(erasing) if erasing else None


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_labels: int):
    """mixup/cutmix over a training batch: (pixels, int labels) -> (mixed pixels, soft labels).
    None when both are off."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    from torchvision.transforms import v2

    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_labels))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels))
    mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def mix(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        pixels, soft = mixer(inputs["pixel_values"], labels)
        return {**inputs, "pixel_values": pixels}, soft

    return mix
