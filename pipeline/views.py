"""Extra views of an image, beside its eval-transform one: seeded train-transform views and LIFT's
test-time views. ``extract`` stores both kinds (stages/extract_data.py); ``predict --tta`` computes the
test-time ones (stages/bundle/run.py). Torch is imported only where a view is made, so the option checks
(``TEST_VIEWS``, ``check_test_views``) stay torch-free.

- Train views: the authors' Phase B runs the frozen backbone on a fresh augmentation at every draw,
  which a one-feature cache would drop; the store keeps V draws of the train transform per image
  instead (docs/fidelity.md). View v of sample ``key`` is drawn after seeding torch with
  ``view_rng_seed(seed, key, v)``, so it is the same whichever process, run or resume computes it.
- Test-time views (``tta_views``): LIFT's resize (its size per eval recipe, pipeline/transforms.py
  ``EVAL_TRANSFORMS``), then crops.
"""
from __future__ import annotations

import hashlib
from typing import Callable

from pipeline.errors import UserError
from pipeline.transforms import EVAL_TRANSFORMS, check_choice

TEST_VIEWS = {"none": 0, "flip": 2, "five-crop": 5, "ten-crop": 10}  # mode -> views per image


def check_test_views(mode: str, option: str) -> None:
    check_choice(mode, TEST_VIEWS, option)


def view_rng_seed(seed: int, key: str, view: int) -> int:
    """The torch seed of view ``view`` of sample ``key``: a hash, so the same in every process and run
    (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.blake2b(f"{seed}/{key}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep clear of the sign bit


class TrainViews:
    """``count`` draws of a random transform per image, draw v of sample ``key`` seeded with
    ``view_rng_seed(seed, key, v)``. The transforms draw from torch's global CPU generator, which is
    seeded per view and restored afterwards (so the caller's own random state is untouched).

    Over a PIL transform, ``__call__`` makes the views. Over a pipeline/tensor_transforms.py
    ``TensorTransform`` (``--decode gpu``), ``draw`` draws the same views' parameters from the same seeds,
    and the device applies them later.
    """

    def __init__(self, transform: Callable, count: int, seed: int):
        self.transform, self.count, self.seed = transform, count, seed

    def seeded(self, key: str, fn: Callable[[], object]) -> list:
        """``fn()`` once per view, torch's generator seeded with that view's seed first."""
        import torch

        out = []
        with torch.random.fork_rng(devices=[]):
            for v in range(self.count):
                torch.default_generator.manual_seed(view_rng_seed(self.seed, key, v))
                out.append(fn())
        return out

    def __call__(self, img, key: str):
        import torch

        return torch.stack(self.seeded(key, lambda: self.transform(img)))

    def draw(self, size: tuple[int, int], key: str) -> tuple:
        """Each view's parameters for an image of ``size`` (width, height): ``TensorTransform.draw``."""
        return tuple(self.seeded(key, lambda: self.transform.draw(size)))


class TtaViews:
    """LIFT's test-time views of an image (resize, then crops; see ``tta_views``), each finished by
    ``finish``; ``__call__`` stacks them. ``crops`` works on PIL images and on image tensors alike."""

    def __init__(self, mode: str, resize: Callable, size: tuple[int, int], finish: Callable):
        self.mode, self.resize, self.size, self.finish = mode, resize, size, finish
        self.count = TEST_VIEWS[mode]

    def crops(self, img) -> list:
        from torchvision.transforms import functional as F

        big = self.resize(img)
        if self.mode == "flip":
            centre = F.center_crop(big, self.size)
            return [centre, F.hflip(centre)]
        return list(F.five_crop(big, self.size) if self.mode == "five-crop" else F.ten_crop(big, self.size))

    def __call__(self, img, key: str | None = None):
        import torch

        return torch.stack([self.finish(c) for c in self.crops(img)])


def tta_views(transform, mode: str, recipe: str = "ballad") -> TtaViews:
    """The test-time views of ``mode`` built from an eval ``transform`` (Resize, CenterCrop(s), then the rest)
    of the eval recipe ``recipe`` (pipeline/transforms.py ``EVAL_TRANSFORMS``).

    As LIFT's test-time ensembling: resize the shorter side to the recipe's size (``lift``, ``lift-plus``:
    s + 24; ``ballad``: s + round(24 s / 224), 248 at 224 alike) with the eval transform's interpolation
    (``lift``: bilinear as LIFT's; ``lift-plus`` and ``ballad``: bicubic), then `five-crop` = the four
    corner crops and the centre crop of s × s (LIFT's and LIFT+'s), `ten-crop` = those and their mirror
    images, `flip` (ours) = the centre crop and its mirror image. The steps after the CenterCrop finish
    every view.
    """
    from torchvision import transforms as T

    if not TEST_VIEWS.get(mode):
        raise UserError(f"test-time views {mode}: choose one of {', '.join(m for m, n in TEST_VIEWS.items() if n)}")
    steps = list(transform.transforms)
    kinds = [type(t) for t in steps]
    if T.Resize not in kinds or T.CenterCrop not in kinds:
        raise UserError(f"test-time views ({mode}) need an eval transform with Resize and CenterCrop, got {transform}")
    resize, at = steps[kinds.index(T.Resize)], kinds.index(T.CenterCrop)
    size = tuple(steps[at].size)
    check_choice(recipe, EVAL_TRANSFORMS, "--eval-transform")
    bigger = T.Resize(EVAL_TRANSFORMS[recipe].tta_resize(size[0]), interpolation=resize.interpolation,
                      antialias=resize.antialias)
    return TtaViews(mode, bigger, size, T.Compose(steps[at + 1:]))
