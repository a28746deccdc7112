"""Every recipe's torchvision transforms (pipeline/transforms.py) replayed on decoded image tensors, on any device.

With ``--decode gpu`` (store/stream.py) the loader workers neither decode nor transform: a worker reads
a sample's compressed bytes and its size from the image header, and ``TensorTransform.draw`` draws the
transform's random parameters there, with the steps' own ``get_params`` calls (torchvision's, or
``SquareRandomResizedCrop``'s), in the order the PIL transform makes them, from the same generator
(the worker's torch generator, seeded as for the CPU path; extract's train views seed it per view). A
sample therefore gets the same crop box, flip and colour-jitter factors and order on either path. The
main process decodes the batch on the GPU (nvJPEG) and ``TensorTransform.__call__`` applies those
parameters there: resizing and cropping per image (the decoded images differ in size), then flip, jitter
and normalisation once for the stacked batch. Nothing here is CUDA-specific, so the tests run it on CPU tensors.

Where the pixels depart from the PIL path (docs/fidelity.md), the drawn parameters being equal:
- resizing is torch's antialiased bicubic (the same a = −0.5 kernel as PIL's) or bilinear (the same
  triangle), computed in float and rounded to uint8 as PIL's output is: within 1/255 of PIL's for the
  eval transforms and bilinear random crops, 0.2/255 on average (measured on photo-like JPEGs,
  tests/test_tensor_transforms.py); bicubic random crops, which enlarge more (PIL keeps uint8 between
  its horizontal and vertical passes, where the kernel's overshoot is clipped), within 3/255 at a few
  pixels;
- colour jitter runs on float [0, 1] images with torchvision's tensor formulas (grey = 0.2989 R +
  0.587 G + 0.114 B, no rounding between the steps), where PIL rounds to uint8 after each step and
  uses its integer grey: with the same draws, within 6/255 of PIL's, 1.5/255 on average;
- nvJPEG's inverse DCT and chroma upsampling are not libjpeg-turbo's.
"""
from __future__ import annotations

import torch
from torchvision.transforms import functional as F
from torchvision.transforms import transforms as T

from pipeline.transforms import SquareRandomResizedCrop, to_rgb

CROPS = (T.RandomResizedCrop, SquareRandomResizedCrop)  # random boxes, then resized: F.resized_crop
GEOMETRY = (*CROPS, T.Resize, T.CenterCrop)
RANDOM = (*CROPS, T.RandomHorizontalFlip, T.ColorJitter)


class TensorTransform:
    """A torchvision ``Compose`` of the steps pipeline/transforms.py builds, split into ``draw`` (per image,
    from its size, where the CPU path would run the transform) and ``__call__`` (the pixel work on a
    batch of decoded images). Refuses, with a ValueError naming the step, what it has no tensor version of.
    """

    def __init__(self, compose):
        self.geometry, self.batched = [], []
        for step in compose.transforms:
            if isinstance(step, T.Lambda) and step.lambd is to_rgb:
                continue  # decoded tensors are RGB already
            if isinstance(step, GEOMETRY):
                if self.batched:
                    raise ValueError(f"no tensor version of {step!r} after {self.batched[-1]!r}")
                if isinstance(step, CROPS) and self.geometry:
                    raise ValueError(f"no tensor version of {step!r} after {self.geometry[-1]!r}")
                self.geometry.append(step)
            elif isinstance(step, (T.RandomHorizontalFlip, T.ToTensor, T.Normalize)) or \
                    (isinstance(step, T.ColorJitter) and step.hue is None):
                self.batched.append(step)
            else:
                raise ValueError(f"no tensor version of {step!r}")
        if not any(isinstance(s, T.ToTensor) for s in self.batched):
            raise ValueError(f"no tensor version of a transform without ToTensor: {compose!r}")
        self.random = [s for s in self.geometry + self.batched if isinstance(s, RANDOM)]

    def draw(self, size: tuple[int, int], key: str | None = None) -> tuple:
        """The random parameters of one image of ``size`` (width, height), one entry per random step:
        the draws the PIL transform makes, from torch's global generator. ``key`` is unused (the
        signature store/stream.py's ``draw`` has)."""
        width, height = size
        params = []
        for step in self.random:
            if isinstance(step, SquareRandomResizedCrop):
                params.append(step.get_params(height, width))
            elif isinstance(step, T.RandomResizedCrop):
                # get_params reads only the shape: a zero-stride stand-in of the image's size
                shape = torch.empty((), dtype=torch.uint8).expand(height, width)
                params.append(tuple(T.RandomResizedCrop.get_params(shape, step.scale, step.ratio)))
            elif isinstance(step, T.RandomHorizontalFlip):
                params.append(bool(torch.rand(1) < step.p))  # RandomHorizontalFlip.forward's draw
            else:
                order, b, c, s, _ = T.ColorJitter.get_params(step.brightness, step.contrast, step.saturation, None)
                params.append((tuple(order.tolist()), b, c, s))
        return tuple(params)

    def __call__(self, images: list, params: list | None = None) -> torch.Tensor:
        """[B, 3, S, S] float32 images, normalised as the CPU path's, from decoded uint8 [3, H, W]
        ``images`` (on one device) and their ``params`` (``draw``'s; None for a transform without
        random steps)."""
        params = params if params is not None else [()] * len(images)
        out = []
        for img, p in zip(images, params):
            for step in self.geometry:
                if isinstance(step, CROPS):
                    img = F.resized_crop(img, *p[0], step.size, step.interpolation, antialias=step.antialias)
                elif isinstance(step, T.Resize):
                    img = F.resize(img, step.size, step.interpolation, step.max_size, step.antialias)
                else:
                    img = F.center_crop(img, step.size)
            out.append(img)
        x = torch.stack(out).float().div_(255)  # ToTensor's scaling, once for the batch
        at = sum(isinstance(s, RANDOM) for s in self.geometry)  # index of the next random step's parameters
        for step in self.batched:
            if isinstance(step, T.RandomHorizontalFlip):
                flip = torch.tensor([p[at] for p in params], device=x.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
                at += 1
            elif isinstance(step, T.ColorJitter):
                x = color_jitter(x, [p[at] for p in params])
                at += 1
            elif isinstance(step, T.Normalize):
                x = F.normalize(x, step.mean, step.std)
        return x


def color_jitter(x: torch.Tensor, params: list) -> torch.Tensor:
    """ColorJitter (brightness, contrast, saturation) on a float [B, 3, H, W] batch in [0, 1], each image
    with its own drawn (order, b, c, s), as torchvision's tensor ``adjust_*`` functions compute them.

    At each of the four positions of the drawn order, every adjustment runs on the whole batch with
    factor 1 for the images whose order puts another one there: a blend with factor 1 is exact
    identity, so each image gets exactly its own sequence, in a dozen batched operations.
    """
    order = torch.tensor([p[0] for p in params])  # [B, 4]; 3 (hue) is never drawn here
    factors = torch.tensor([[1.0 if f is None else f for f in p[1:]] for p in params])  # [B, 3]
    for position in range(order.shape[1]):
        for fn, adjust in enumerate((_brightness, _contrast, _saturation)):
            f = torch.where(order[:, position] == fn, factors[:, fn], 1.0)
            if bool((f != 1).any()):
                x = adjust(x, f.to(x.device).view(-1, 1, 1, 1))
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(x, other, f):
    return (f * x + (1.0 - f) * other).clamp_(0, 1)


def _brightness(x, f):
    return _blend(x, 0.0, f)


def _contrast(x, f):
    return _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x, f):
    return _blend(x, _grey(x), f)
