"""pipeline/transforms.py: each recipe's train and eval transforms against references written here from
the papers' code (torchvision's own RandomResizedCrop / Resize / CenterCrop / FiveCrop with LIFT's and
LIFT+'s arguments, LIFT+'s square crop and MDA schedules), on the same seeds; test-time views per recipe."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.errors import UserError
from pipeline.tensor_transforms import TensorTransform
from pipeline.transforms import (CLIP_MEAN, CLIP_STD, EVAL_TRANSFORMS, TRAIN_TRANSFORMS, SquareRandomResizedCrop,
                                 build_transforms, eval_transform, mda_min_scale, normalization, to_rgb,
                                 train_transform)
from pipeline.views import tta_views

BICUBIC, BILINEAR = T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR
SETTINGS = {"epoch": 1, "epochs": 3}  # MDA halfway through: a crop scale range that is neither end


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def finished(*steps, mean=CLIP_MEAN, std=CLIP_STD):
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def same_on_seeds(ours, reference, img, seeds=range(8)):
    for seed in seeds:
        torch.manual_seed(seed)
        want, after = reference(img), torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(ours(img), want), seed
        assert torch.equal(torch.get_rng_state(), after), seed  # the same draws, nothing more or less


@pytest.mark.parametrize("name", list(TRAIN_TRANSFORMS))
def test_every_train_transform_is_rgb_steps_tensor_normalize_and_has_a_tensor_replay(name):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tf = train_transform(name, 24, mean, std, **SETTINGS)
    steps = tf.transforms
    assert isinstance(steps[0], T.Lambda) and steps[0].lambd is to_rgb
    assert isinstance(steps[-2], T.ToTensor) and steps[-1].mean == mean and steps[-1].std == std
    tensor = TensorTransform(tf)  # refuses a step it cannot replay
    grey = image(50, 40).convert("L")
    for seed in range(10):  # the draws are the PIL transform's, and its output the drawn steps' ops
        torch.manual_seed(seed)
        params = tensor.draw(grey.size)
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        want = tf(grey)
        assert torch.equal(torch.get_rng_state(), after) and want.shape == (3, 24, 24)
        ref = grey.convert("RGB")
        for step, p in zip(tensor.random, params):
            if isinstance(step, T.RandomHorizontalFlip):
                ref = F.hflip(ref) if p else ref
            elif isinstance(step, T.ColorJitter):
                order, *factors = p
                adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
                for fn in (k for k in order if k < 3):
                    ref = adjust[fn](ref, factors[fn])
            else:
                ref = F.resized_crop(ref, *p, list(step.size), step.interpolation)
        assert torch.equal(steps[-1](F.to_tensor(ref)), want), seed


def test_unknown_recipes_are_refused_naming_the_option():
    with pytest.raises(UserError, match="--train-transform lift-plus: choose one of ballad, lift, mda"):
        train_transform("lift-plus", 224)
    with pytest.raises(UserError, match="--eval-transform mda: choose one of ballad, lift, lift-plus"):
        eval_transform("mda", 224)
    with pytest.raises(UserError, match="--eval-transform nope"):
        tta_views(eval_transform("lift", 32), "five-crop", "nope")


def test_ballad_train_transform_is_the_authors_on_the_same_seeds():
    authors = finished(T.RandomResizedCrop(32, scale=(0.5, 1), interpolation=BICUBIC), T.RandomHorizontalFlip(),
                       T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
    same_on_seeds(train_transform("ballad", 32), authors, image(50, 40))
    assert repr(build_transforms(32)[0]) == repr(train_transform("ballad", 32))


def test_lift_train_transform_is_torchvisions_with_lifts_arguments():
    # LIFT's trainer: RandomResizedCrop(resolution), RandomHorizontalFlip(): torchvision's defaults
    lift = finished(T.RandomResizedCrop(224), T.RandomHorizontalFlip())
    ours = train_transform("lift", 224)
    crop = ours.transforms[1]
    assert (crop.scale, crop.ratio, crop.interpolation) == ((0.08, 1.0), (3 / 4, 4 / 3), BILINEAR)
    assert [type(t) for t in ours.transforms[1:]] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor,
                                                      T.Normalize]
    img = image(300, 260)
    same_on_seeds(ours, lift, img, seeds=range(4))
    for seed in range(20):  # the boxes: torchvision's get_params with LIFT's scale and ratio
        torch.manual_seed(seed)
        want = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert TensorTransform(ours).draw(img.size)[0] == tuple(want)


def test_color_jitter_strength_and_zero_turns_it_off():
    weaker, _ = build_transforms(32, color_jitter=0.2)
    assert next(t for t in weaker.transforms if isinstance(t, T.ColorJitter)).brightness == pytest.approx((0.8, 1.2))
    off, _ = build_transforms(32, color_jitter=0)
    assert [type(t) for t in off.transforms] == [T.Lambda, T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor,
                                                 T.Normalize]
    flat = Image.new("RGB", (40, 40), (200, 30, 30))  # crops and flips cannot change it; colour jitter can
    _, evaluate = build_transforms(32)
    torch.manual_seed(0)
    assert torch.equal(off(flat), evaluate(flat))
    assert not torch.allclose(build_transforms(32)[0](flat), evaluate(flat), atol=1e-3)


def _schedule(name: str, t: float) -> float:
    """LIFT+'s get_min_scale, by hand."""
    s = {"min": 0.0, "max": 1.0, "linear": t, "convex": 1 - (1 - t * t) ** 0.5, "concave": (1 - (1 - t) ** 2) ** 0.5}
    return 0.08 + 0.92 * s[name]


@pytest.mark.parametrize("schedule", ["convex", "linear", "concave", "min", "max"])
def test_mda_min_scale_follows_lift_plus_schedules(schedule):
    epochs = 5
    for epoch in range(epochs):
        want = _schedule(schedule, epoch / 4)
        assert mda_min_scale(epoch, epochs, schedule) == pytest.approx(want, abs=1e-12)
        crop = train_transform("mda", 224, epoch=epoch, epochs=epochs, mda_schedule=schedule).transforms[1]
        assert crop.scale == (pytest.approx(want, abs=1e-12), 1.0)
    first, last = mda_min_scale(0, epochs, schedule), mda_min_scale(epochs - 1, epochs, schedule)
    assert first == pytest.approx(1.0 if schedule == "max" else 0.08)
    assert last == pytest.approx(0.08 if schedule == "min" else 1.0)


def test_mda_schedule_values_at_given_epochs():
    # t = 1/2 of 3 epochs: convex 1 − √(3/4), concave √(3/4), linear 1/2
    assert mda_min_scale(1, 3, "convex") == pytest.approx(0.08 + 0.92 * (1 - math.sqrt(0.75)))
    assert mda_min_scale(1, 3, "concave") == pytest.approx(0.08 + 0.92 * math.sqrt(0.75))
    assert mda_min_scale(1, 3, "linear") == pytest.approx(0.54)
    assert mda_min_scale(0, 1, "convex") == pytest.approx(0.08)  # one epoch: t = 0 (LIFT+ divides by zero)
    with pytest.raises(UserError, match="--mda-schedule cosine: choose one of convex, linear, concave, min, max"):
        mda_min_scale(0, 5, "cosine")
    with pytest.raises(ValueError, match="epoch 5 outside 0..4"):
        mda_min_scale(5, 5, "convex")


def _lift_plus_box(height: int, width: int, min_scale: float):
    """LIFT+'s MinimalistRandomResizedCrop.get_params, written from its code."""
    area = height * width
    largest = min(height, width) ** 2 / area
    target = area * torch.empty(1).uniform_(min(min_scale, largest), min(1.0, largest)).item()
    side = int(round(math.sqrt(target)))
    top = torch.randint(0, height - side + 1, size=(1,)).item()
    return top, torch.randint(0, width - side + 1, size=(1,)).item(), side, side


@pytest.mark.parametrize("size", [(300, 260), (260, 300), (400, 40)], ids=str)  # 400 × 40: past q, the largest square
def test_mda_crop_is_lift_plus_square_crop_bicubic_without_flip_or_jitter(size):
    width, height = size
    tf = train_transform("mda", 224, epoch=1, epochs=3)
    assert [type(t) for t in tf.transforms] == [T.Lambda, SquareRandomResizedCrop, T.ToTensor, T.Normalize]
    crop = tf.transforms[1]
    assert crop.interpolation == BICUBIC and crop.size == (224, 224)
    sides = []
    for seed in range(50):
        torch.manual_seed(seed)
        want = _lift_plus_box(height, width, crop.scale[0])
        torch.manual_seed(seed)
        got = crop.get_params(height, width)
        assert got == want, seed
        top, left, h, w = got
        assert h == w and 0 <= top <= height - h and 0 <= left <= width - w
        sides.append(h)
    if width / height >= 1 / crop.scale[0]:
        assert set(sides) == {min(width, height)}
    else:  # area fractions spread over [s_min, 1]
        fractions = np.square(sides) / (width * height)
        largest = min(width, height) ** 2 / (width * height)
        assert fractions.min() < crop.scale[0] + 0.05 and fractions.max() > largest - 0.05
    img = image(width, height)
    same_on_seeds(tf, finished(T.Lambda(lambda im: F.resized_crop(im, *_lift_plus_box(height, width, crop.scale[0]),
                                                                  [224, 224], BICUBIC))), img, seeds=range(3))


def test_a_tiny_image_still_gets_a_one_pixel_square():
    crop = SquareRandomResizedCrop(8, 0.08)
    torch.manual_seed(0)
    boxes = {crop.get_params(1, 2) for _ in range(20)}
    assert boxes <= {(0, 0, 1, 1), (0, 1, 1, 1)}
    assert crop(Image.new("RGB", (2, 1))).size == (8, 8)


@pytest.mark.parametrize("name, resize, mode", [("ballad", 224, BICUBIC), ("lift", 256, BILINEAR),
                                                ("lift-plus", 256, BICUBIC)])
def test_eval_transforms_are_the_papers_resize_and_centre_crop(name, resize, mode):
    # BALLAD: Resize(224, bicubic); LIFT: Resize(224 * 8 // 7); LIFT+: Resize(224 + 224 // 7, bicubic)
    ours = eval_transform(name, 224)
    img = image(300, 260)
    assert torch.equal(ours(img), finished(T.Resize(resize, interpolation=mode), T.CenterCrop(224))(img))
    assert eval_transform(name, 336).transforms[0].size == {"ballad": 336}.get(name, 384)  # 336 · 8 // 7
    assert normalization(ours) == (CLIP_MEAN, CLIP_STD)
    assert repr(build_transforms(224)[1]) == repr(eval_transform("ballad", 224))


@pytest.mark.parametrize("name, resize, mode", [("ballad", 248, BICUBIC), ("lift", 248, BILINEAR),
                                                ("lift-plus", 248, BICUBIC)])
def test_five_crop_views_are_the_papers_tte(name, resize, mode):
    # LIFT / LIFT+: Resize(224 + 24), FiveCrop(224), each crop to a tensor, Normalize: no flip
    views = tta_views(eval_transform(name, 224), "five-crop", name)
    tte = T.Compose([T.Resize(resize, interpolation=mode), T.FiveCrop(224),
                     T.Lambda(lambda crops: torch.stack([T.ToTensor()(c) for c in crops])),
                     T.Normalize(CLIP_MEAN, CLIP_STD)])
    img = image(300, 260)
    assert torch.equal(views(img), tte(img))
    assert tta_views(eval_transform(name, 32), "five-crop", name).resize.size == {"ballad": 35}.get(name, 56)


def test_normalization_needs_a_normalize_step():
    assert normalization(train_transform("lift", 32, (0.1, 0.2, 0.3), (1, 2, 3))) == ((0.1, 0.2, 0.3), (1, 2, 3))
    with pytest.raises(ValueError, match="no Normalize step"):
        normalization(T.Compose([T.ToTensor()]))
