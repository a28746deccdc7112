"""Each recipe's image transforms: a registry of train transforms and one of eval transforms.

Torch-free at import (the config modules read the names for their choices); torchvision is imported
where a transform is built. Every transform converts to RGB first (the authors' loaders do so on
reading; pipeline/tensor_transforms.py skips the step, decoded tensors being RGB) and ends in ToTensor +
Normalize with the backbone's mean and std. pipeline/tensor_transforms.py replays every step type used
here on decoded tensors (``--decode gpu``), drawing the same parameters from the same generator, so an
entry made of known step types needs nothing there; a new step type needs its replay there too.

Train transforms (``TRAIN_TRANSFORMS``, built by ``train_transform`` for one epoch):
- ``ballad``: the authors' RandomResizedCrop(s, scale 0.5–1, bicubic), horizontal flip and
  ColorJitter(b, b, b, 0), b = ``color_jitter`` (0 leaves it out);
- ``lift``: LIFT's RandomResizedCrop(s, scale 0.08–1, ratio 3/4–4/3, bilinear: torchvision's defaults)
  and horizontal flip, no colour jitter;
- ``mda``: LIFT+'s minimalist augmentation, only a square random crop (``SquareRandomResizedCrop``,
  bicubic) whose least area fraction rises with the epoch (``mda_min_scale``); no flip, no jitter.

Eval transforms (``EVAL_TRANSFORMS``; ``eval_transform`` and pipeline/views.py's test-time views):
- ``ballad``: the authors' Resize(s, bicubic) + CenterCrop(s); test-time views resize to
  s + round(24 s / 224) (ours: LIFT's +24 at 224, scaled for other sizes), bicubic;
- ``lift``: LIFT's Resize(8 s // 7, bilinear) + CenterCrop(s); test-time views Resize(s + 24, bilinear).
  LIFT's ViT-L/14 configs expand by 21 instead of 24; we use 24 for every size;
- ``lift-plus``: LIFT+'s Resize(s + s // 7, bicubic) + CenterCrop(s) (the same size as LIFT's);
  test-time views Resize(s + 24, bicubic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from pipeline.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COLOR_JITTER = 0.4  # the authors' ColorJitter(brightness, contrast, saturation = 0.4, hue = 0)
MDA_LOW = 0.08  # LIFT+'s crop scale range starts as RandomResizedCrop's, (0.08, 1)

# LIFT+'s schedules s(t) of the training progress t = epoch / (epochs − 1): the least crop area fraction
# is MDA_LOW + s(t) · (1 − MDA_LOW).
MDA_SCHEDULES: dict[str, Callable[[float], float]] = {
    "convex": lambda t: 1 - math.sqrt(1 - t ** 2),  # LIFT+'s default
    "linear": lambda t: t,
    "concave": lambda t: math.sqrt(1 - (1 - t) ** 2),
    "min": lambda t: 0.0,
    "max": lambda t: 1.0,
}


def to_rgb(img):
    """The PIL image in RGB (pipeline/tensor_transforms.py skips this step: its decoded tensors are RGB)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def mda_min_scale(epoch: int, epochs: int, schedule: str) -> float:
    """The least crop area fraction of LIFT+'s MDA in epoch ``epoch`` (0-based) of ``epochs``.

    LIFT+ divides by epochs − 1 and so fails on a one-epoch run; we take t = 0 there (its first epoch's
    crops)."""
    check_choice(schedule, MDA_SCHEDULES, "--mda-schedule")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} outside 0..{epochs - 1}")
    t = epoch / (epochs - 1) if epochs > 1 else 0.0
    return MDA_SCHEDULES[schedule](t) * (1.0 - MDA_LOW) + MDA_LOW


class SquareRandomResizedCrop:
    """LIFT+'s ``MinimalistRandomResizedCrop`` at one epoch: a square crop, resized to ``size``.

    Its area is ``area · U(lo, hi)``, lo = min(min_scale, q), hi = min(1, q), q the largest square's
    share of the image (so the square fits: past q every draw is the largest square); side =
    round(√area), top and left uniform integers: the same draws from torch's generator, in the same
    order, as LIFT+'s. Ours takes a side of at least 1 pixel (LIFT+'s fails on an image under 4
    pixels). LIFT+ mutates one crop per epoch (``step()``); here each epoch builds its own.
    """

    def __init__(self, size: int, min_scale: float, interpolation: str = "bicubic"):
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale {min_scale} outside (0, 1]")
        self.size, self.scale = (size, size), (min_scale, 1.0)
        self.interpolation, self.antialias = _mode(interpolation), True

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, side, side) of one crop of an image of ``height`` × ``width``."""
        import torch

        area = height * width
        largest = min(height, width) ** 2 / area
        lo, hi = min(self.scale[0], largest), min(self.scale[1], largest)
        side = max(1, int(round(math.sqrt(area * torch.empty(1).uniform_(lo, hi).item()))))
        top = int(torch.randint(0, height - side + 1, size=(1,)).item())
        left = int(torch.randint(0, width - side + 1, size=(1,)).item())
        return top, left, side, side

    def __call__(self, img):
        from torchvision.transforms import functional as F

        _, height, width = F.get_dimensions(img)
        return F.resized_crop(img, *self.get_params(height, width), self.size, self.interpolation,
                              antialias=self.antialias)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"interpolation={self.interpolation.value}, antialias={self.antialias})")


def _ballad_steps(size: int, *, color_jitter: float, **_) -> list:
    from torchvision import transforms as T

    jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter, 0)] if color_jitter else []
    return [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=_mode("bicubic")), T.RandomHorizontalFlip(),
            *jitter]


def _lift_steps(size: int, **_) -> list:
    from torchvision import transforms as T

    return [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=_mode("bilinear")), T.RandomHorizontalFlip()]


def _mda_steps(size: int, *, epoch: int, epochs: int, mda_schedule: str, **_) -> list:
    return [SquareRandomResizedCrop(size, mda_min_scale(epoch, epochs, mda_schedule), "bicubic")]


# name -> the steps between the RGB conversion and ToTensor, for (image size, epoch, epochs, settings)
TRAIN_TRANSFORMS: dict[str, Callable[..., list]] = {"ballad": _ballad_steps, "lift": _lift_steps, "mda": _mda_steps}


@dataclass(frozen=True)
class EvalRecipe:
    """An eval transform: the shorter side before the centre crop of s, the test-time views' shorter side
    (pipeline/views.py ``tta_views``) and the interpolation of both."""

    interpolation: str
    resize: Callable[[int], int]
    tta_resize: Callable[[int], int]


EVAL_TRANSFORMS: dict[str, EvalRecipe] = {
    "ballad": EvalRecipe("bicubic", lambda s: s, lambda s: s + round(s * 24 / 224)),
    "lift": EvalRecipe("bilinear", lambda s: s * 8 // 7, lambda s: s + 24),
    "lift-plus": EvalRecipe("bicubic", lambda s: s + s // 7, lambda s: s + 24),
}


def check_choice(name: str, choices, option: str) -> None:
    if name not in choices:
        raise UserError(f"{option} {name}: choose one of {', '.join(choices)}")


def _finish(steps: list, mean, std):
    from torchvision import transforms as T

    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def train_transform(name: str, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, *, epoch: int = 0, epochs: int = 1,
                    color_jitter: float = COLOR_JITTER, mda_schedule: str = "convex"):
    """The train transform ``name`` of epoch ``epoch`` (0-based) of ``epochs`` (only ``mda`` depends on
    them), ``color_jitter`` for ``ballad``, ``mda_schedule`` for ``mda``."""
    from torchvision import transforms as T

    check_choice(name, TRAIN_TRANSFORMS, "--train-transform")
    steps = TRAIN_TRANSFORMS[name](image_size, epoch=epoch, epochs=epochs, color_jitter=color_jitter,
                                   mda_schedule=mda_schedule)
    return _finish([T.Lambda(to_rgb), *steps], mean, std)


def eval_transform(name: str, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """The eval transform ``name``: Resize, CenterCrop(``image_size``), then RGB, ToTensor, Normalize."""
    from torchvision import transforms as T

    check_choice(name, EVAL_TRANSFORMS, "--eval-transform")
    recipe = EVAL_TRANSFORMS[name]
    return _finish([T.Resize(recipe.resize(image_size), interpolation=_mode(recipe.interpolation)),
                    T.CenterCrop(image_size), T.Lambda(to_rgb)], mean, std)


def build_transforms(image_size: int, mean=CLIP_MEAN, std=CLIP_STD, color_jitter: float = COLOR_JITTER):
    """The authors' (train, eval) transforms: ``ballad`` of both registries (the model factory's)."""
    return (train_transform("ballad", image_size, mean, std, color_jitter=color_jitter),
            eval_transform("ballad", image_size, mean, std))


def normalization(transform) -> tuple[tuple, tuple]:
    """(mean, std) of a transform's Normalize step: a stage building another recipe's transforms for a
    backbone passes its eval transform's."""
    norm = next((t for t in getattr(transform, "transforms", []) if type(t).__name__ == "Normalize"), None)
    if norm is None:
        raise ValueError(f"no Normalize step in {transform!r}")
    return tuple(norm.mean), tuple(norm.std)


def with_recipes(backbone, eval_recipe: str, train_recipe: str):
    """``backbone`` (pipeline/models.py) with the eval transform ``eval_recipe`` and the train transform
    ``train_recipe`` at its image size, mean and std (ballad: the factory's own): what extract encodes
    with, and what a bundle of its store rebuilds."""
    from dataclasses import replace

    mean, std = normalization(backbone.eval_transform)
    size = backbone.image_size
    return replace(backbone, eval_transform=eval_transform(eval_recipe, size, mean, std),
                   train_transform=train_transform(train_recipe, size, mean, std))
