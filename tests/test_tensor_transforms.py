"""pipeline/tensor_transforms.py (the transforms of `--decode gpu`) against the PIL transforms it replays,
run on CPU tensors: the same draws from the same generator, pixels within a pinned tolerance, and the
crop, flip and jitter distributions of the two paths alike."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from bench.extract import jpeg
from pipeline.tensor_transforms import TensorTransform, color_jitter
from pipeline.transforms import EVAL_TRANSFORMS, TRAIN_TRANSFORMS, build_transforms, eval_transform, train_transform
from pipeline.views import tta_views

BICUBIC = T.InterpolationMode.BICUBIC
# |Δ| against the PIL path in 1/255 of the pixel range, measured on photo-like JPEGs: eval ≤ 1 level anywhere
# (antialiased bicubic, the same kernel, rounded alike), 0.17 on average; train with the same draws (colour
# jitter: float vs PIL's uint8 rounding after each step, torchvision's vs PIL's grey) ≤ 5 levels, 1.6 on average.
EVAL_MAX, EVAL_MEAN = 1.0, 0.25
TRAIN_MAX, TRAIN_MEAN = 6.0, 2.0
CROP_MAX = 3.0  # random crops without jitter (bicubic ones enlarge more): ≤ 3 levels at a few pixels, eval's mean


def photo(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG; the tolerances below were measured on this 5 × 7 colour field."""
    return jpeg(seed, width, height, grid=(5, 7))


def decoded(raw: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)


def levels(a: torch.Tensor, b: torch.Tensor, std) -> torch.Tensor:
    """|a − b| of normalised images in 1/255 of the pixel range."""
    return (a - b).abs() * torch.tensor(std).view(3, 1, 1) * 255


SIZES = [(500, 375), (375, 500), (333, 500), (64, 48)]


@pytest.mark.parametrize("size", SIZES + [(400, 20)], ids=str)  # 400 × 20: every try fails, the central fallback
def test_draws_are_the_ones_the_pil_transform_makes(size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    train, _ = build_transforms(24)
    tensor = TensorTransform(train)
    normalize = train.transforms[-1]
    for seed in range(40):
        torch.manual_seed(seed)
        (i, j, h, w), flip, (order, b, c, s) = tensor.draw(img.size)
        after_draw = torch.get_rng_state()
        torch.manual_seed(seed)
        want = train(img)
        assert torch.equal(torch.get_rng_state(), after_draw)  # the same draws, nothing more or less
        # The PIL transform's output is exactly the functional ops applied with the drawn parameters.
        ref = F.resized_crop(img, i, j, h, w, [24, 24], BICUBIC)
        ref = F.hflip(ref) if flip else ref
        for fn in order:
            ref = {0: lambda x: F.adjust_brightness(x, b), 1: lambda x: F.adjust_contrast(x, c),
                   2: lambda x: F.adjust_saturation(x, s), 3: lambda x: x}[fn](ref)
        assert torch.equal(normalize(F.to_tensor(ref)), want), seed


@pytest.mark.parametrize("recipe", list(EVAL_TRANSFORMS))
@pytest.mark.parametrize("out", [224, 32])
def test_eval_transform_is_the_pil_one_within_a_level(out, recipe):
    evaluate = eval_transform(recipe, out)
    tensor = TensorTransform(evaluate)
    std = evaluate.transforms[-1].std
    raws = [photo(k, *size) for k, size in enumerate(SIZES)]
    got = tensor([decoded(r) for r in raws])
    assert got.shape == (len(raws), 3, out, out) and got.dtype == torch.float32
    for raw, g in zip(raws, got):
        want = evaluate(Image.open(io.BytesIO(raw)))
        diff = levels(g, want, std)
        assert diff.max() <= EVAL_MAX + 1e-3 and diff.mean() <= EVAL_MEAN
        # The tolerance catches a crop 8 source pixels off, a mirror image and a missing normalisation.
        shifted = tensor([decoded(raw)[:, :, 8:]])[0]
        assert levels(shifted, want, std).mean() > 4 * EVAL_MEAN
        assert levels(g.flip(-1), want, std).mean() > 4 * EVAL_MEAN
        unnormalised = TensorTransform(T.Compose(evaluate.transforms[:-1]))([decoded(raw)])[0]
        assert levels(unnormalised, want, std).mean() > 4 * EVAL_MEAN


@pytest.mark.parametrize("jitter", [0.4, 0.0])
def test_train_transform_with_the_same_draws_is_the_pil_one_within_tolerance(jitter):
    train, _ = build_transforms(224, color_jitter=jitter)
    tensor = TensorTransform(train)
    std = train.transforms[-1].std
    most, mean = (TRAIN_MAX, TRAIN_MEAN) if jitter else (EVAL_MAX, EVAL_MEAN)
    for k, size in enumerate(SIZES[:3]):
        raw = photo(10 + k, *size)
        img = Image.open(io.BytesIO(raw))
        for seed in range(3):
            torch.manual_seed(seed)
            want = train(img)
            torch.manual_seed(seed)
            params = tensor.draw(img.size)
            diff = levels(tensor([decoded(raw)], [params])[0], want, std)
            assert diff.max() <= most + 1e-3 and diff.mean() <= mean, (size, seed)


@pytest.mark.parametrize("name", list(TRAIN_TRANSFORMS))
def test_every_train_transform_with_the_same_draws_is_the_pil_one_within_tolerance(name):
    train = train_transform(name, 224, epoch=1, epochs=3)
    tensor = TensorTransform(train)
    std = train.transforms[-1].std
    jitter = any(isinstance(t, T.ColorJitter) for t in train.transforms)
    most, mean = (TRAIN_MAX, TRAIN_MEAN) if jitter else (CROP_MAX, EVAL_MEAN)
    for k, size in enumerate(SIZES[:3]):
        raw = photo(20 + k, *size)
        img = Image.open(io.BytesIO(raw))
        for seed in range(6):
            torch.manual_seed(seed)
            want = train(img)
            torch.manual_seed(seed)
            params = tensor.draw(img.size)
            got = tensor([decoded(raw)], [params])[0]
            diff = levels(got, want, std)
            assert diff.max() <= most + 1e-3 and diff.mean() <= mean, (size, seed)
            # the tolerance catches the crop of another draw
            torch.manual_seed(seed + 100)
            other = tensor([decoded(raw)], [tensor.draw(img.size)])[0]
            assert levels(other, want, std).mean() > 4 * mean


@pytest.mark.parametrize("recipe", list(EVAL_TRANSFORMS))
def test_test_time_views_on_tensors_are_the_pil_ones_within_a_level(recipe):
    views = tta_views(eval_transform(recipe, 224), "five-crop", recipe)
    finish = TensorTransform(views.finish)
    std = views.finish.transforms[-1].std
    raw = photo(30, 500, 375)
    want = views(Image.open(io.BytesIO(raw)))
    got = finish(views.crops(decoded(raw)))
    assert got.shape == want.shape == (5, 3, 224, 224)
    diff = levels(got, want, std)
    assert diff.max() <= EVAL_MAX + 1e-3 and diff.mean() <= EVAL_MEAN
    assert levels(got.roll(1, 0), want, std).mean() > 4 * EVAL_MEAN  # the views in their order


def _box(out: torch.Tensor, width: int, height: int):
    """(area fraction, log aspect, flipped) of the crop that outputs [N, 3, S, S] of the coordinate image
    show: red is x·255/(width − 1), green y·255/(height − 1), so the first and last columns and rows
    give the box (the same estimate for both paths: its bias at the crop's edges cancels out)."""
    s = out.shape[-1]
    r, g = out[:, 0] * (width - 1), out[:, 1] * (height - 1)
    dx = (r[:, :, -1].mean(1) - r[:, :, 0].mean(1)) * s / (s - 1)
    dy = (g[:, -1, :].mean(1) - g[:, 0, :].mean(1)) * s / (s - 1)
    w, h = dx.abs(), dy.abs()
    return (w * h / (width * height)).numpy(), (w / h).log().numpy(), (dx < 0).numpy()


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic."""
    pooled = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), pooled, "right") / len(a)
                        - np.searchsorted(np.sort(b), pooled, "right") / len(b)).max())


@pytest.mark.slow
def test_crop_scale_aspect_and_flip_distributions_match_the_pil_path():
    width, height, n, out = 128, 96, 2000, 16
    x, y = np.meshgrid(np.arange(width) * 255 / (width - 1), np.arange(height) * 255 / (height - 1))
    coords = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    img, tensor_img = Image.fromarray(coords), torch.from_numpy(coords).permute(2, 0, 1)
    train, _ = build_transforms(out, color_jitter=0)
    geometry = T.Compose(train.transforms[:-2])  # the CPU path up to ToTensor + Normalize
    tensor = TensorTransform(T.Compose([*train.transforms[:-1], T.Normalize((0, 0, 0), (1, 1, 1))]))
    pil = []
    for seed in range(n):  # the CPU path
        torch.manual_seed(seed)
        pil.append(torch.from_numpy(np.array(geometry(img))).permute(2, 0, 1) / 255)
    params = []
    for seed in range(10_000, 10_000 + n):  # the device path, other seeds
        torch.manual_seed(seed)
        params.append(tensor.draw(img.size))
    got = torch.cat([tensor([tensor_img] * 500, params[i:i + 500]) for i in range(0, n, 500)])
    (area_a, aspect_a, flip_a), (area_b, aspect_b, flip_b) = _box(torch.stack(pil), width, height), \
        _box(got, width, height)
    # n = 2000 each: the statistic exceeds 0.062 by chance with probability 0.001.
    assert _ks(area_a, area_b) < 0.062 and _ks(aspect_a, aspect_b) < 0.062
    assert abs(flip_a.mean() - 0.5) < 0.035 and abs(flip_b.mean() - 0.5) < 0.035
    # The estimates follow the drawn boxes: the crops are where the parameters say.
    crop = np.array([p[0] for p in params], dtype=float)  # (i, j, h, w)
    assert np.corrcoef(crop[:, 2] * crop[:, 3] / (width * height), area_b)[0, 1] > 0.99
    assert np.corrcoef(np.log(crop[:, 3] / crop[:, 2]), aspect_b)[0, 1] > 0.99
    assert np.array_equal(np.array([p[1] for p in params]), flip_b)


def test_flip_and_jitter_draws_cover_their_ranges():
    for strength in (0.4, 0.1):
        tensor = TensorTransform(build_transforms(32, color_jitter=strength)[0])
        torch.manual_seed(0)
        params = [tensor.draw((50, 40)) for _ in range(2000)]
        assert abs(np.mean([p[1] for p in params]) - 0.5) < 0.035
        factors = np.array([p[2][1:] for p in params])
        assert factors.min() >= 1 - strength and factors.max() <= 1 + strength
        assert factors.min() < 1 - 0.98 * strength and factors.max() > 1 + 0.98 * strength
        assert np.abs(factors.mean(0) - 1).max() < 0.02 * strength / 0.4 + 0.01
        assert all(sorted(p[2][0]) == [0, 1, 2, 3] for p in params)
        assert len({p[2][0] for p in params}) == 24  # every order of the four


def test_batched_jitter_is_torchvisions_per_image_jitter():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=gen)
    params = [(tuple(torch.randperm(4, generator=gen).tolist()),
               *(0.6 + 0.8 * torch.rand(3, generator=gen)).tolist()) for _ in range(6)]
    params[2] = ((1, 0, 3, 2), 1.0, 1.3, None)  # a factor not drawn (None) leaves its step out
    got = color_jitter(x.clone(), params)
    for img, (order, b, c, s), g in zip(x, params, got):
        steps = {0: lambda t: F.adjust_brightness(t, b), 1: lambda t: F.adjust_contrast(t, c),
                 2: lambda t: t if s is None else F.adjust_saturation(t, s), 3: lambda t: t}
        for fn in order:
            img = steps[fn](img)
        torch.testing.assert_close(g, img, atol=1e-6, rtol=0)


def test_steps_without_a_tensor_version_are_refused():
    for compose, named in ((T.Compose([T.RandomRotation(10), T.ToTensor()]), "RandomRotation"),
                           (T.Compose([T.ColorJitter(0.4, hue=0.1), T.ToTensor()]), "ColorJitter"),
                           (T.Compose([T.ToTensor(), T.Resize(8)]), "Resize"),
                           (T.Compose([T.Resize(8), T.RandomResizedCrop(4), T.ToTensor()]), "RandomResizedCrop"),
                           (T.Compose([T.Resize(8)]), "without ToTensor")):
        with pytest.raises(ValueError, match=f"no tensor version of .*{named}"):
            TensorTransform(compose)
