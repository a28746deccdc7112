"""Phase A's trained classifier head (``--classifier head``): which image-tower feature it reads
(``--head-input``) and how its weights start (``--head-init``, one registered ``HeadInit`` per method).

Placement (LIFT, Shi et al. ICML 2024; our own implementation of what its code does):
- ``pre-projection`` (default, LIFT's): on an open_clip ViT the head reads the pooled token after
  ``ln_post``, before ``@ proj`` (768-d for ViT-B/16). The text initialisation maps the class prompts'
  normalised text features t back through the image projection P [width, embed]:
  W = normalize(normalize(t) · Pᵀ). At initialisation the head's logit for class k is then the
  zero-shot cosine × (|hP| / |h|) / |P·t_k| (h the pre-projection feature): a per-class rescale and a
  per-image temperature, not the zero-shot logits themselves. A tower without such a projection
  (open_clip's ModifiedResNet, whose attention pool ends in its own projection, or a timm tower) is
  read at its output, the embedding, with W = normalize(t): LIFT's code reads a ResNet's attnpool
  output the same way. final.json's ``head_input`` records the feature actually read.
- ``projection`` (ours, a departure from LIFT): the projected embedding on every tower, W = normalize(t),
  so the head's initial logits are the zero-shot ones.
``extract`` stores the feature the head reads and the head as the class embeddings, so Phase B, TTA,
kNN, export and predict work on either placement (``feature_model`` gives them the right encoder).

Initialisation: ``text`` (LIFT's ``text_feat``), ``class-mean`` (LIFT's ``init_head_class_mean``:
the L2-normalised mean feature, at the head's input, of train images under the eval transform, from
the model before any training step) and ``linear-probe`` (LIFT's ``init_head_linear_probe``: the
L2-normalised coefficient rows of a class-balanced L2 logistic regression on those features,
pipeline/probe.py). LIFT's code takes every train image for both; LIFT+ takes at most 100 per class
(``DownSampler(n_max=100)``), which is our default (``--head-init-shots``, ``choose_per_class``;
``none``: every image). LIFT+ draws the 100 at random each run; ours are a function of ``--seed``.
Adding a method is one subclass decorated with ``@register`` and its test.

Importing this module does not import torch (the configs read ``HEAD_INPUTS`` and ``HEAD_INITS``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

from pipeline.errors import UserError

PRE_PROJECTION, PROJECTION = "pre-projection", "projection"
HEAD_INPUTS = (PRE_PROJECTION, PROJECTION)
HEAD_INPUT_HELP = ("The image feature --classifier head reads. pre-projection: a ViT's pooled token before the image "
                   "projection (LIFT; a ResNet's embedding); projection: the projected embedding on every tower.")
REGISTRY: dict[str, "HeadInit"] = {}


def _projection(model):
    """The image projection P [width, embed] of an open_clip ViT tower, or None for a tower without one."""
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    return visual.proj if isinstance(visual, VisionTransformer) and visual.proj is not None else None


def resolved_head_input(model, head_input: str) -> str:
    """The feature ``head_input`` reads on this model: pre-projection only where the tower has a projection."""
    return PRE_PROJECTION if head_input == PRE_PROJECTION and _projection(model) is not None else PROJECTION


def feature_dim(model, head_input: str, embed_dim: int) -> int:
    """Dimensions of the feature at ``head_input`` (resolved): the ViT's width before the projection, else D."""
    return int(model.visual.proj.shape[0]) if head_input == PRE_PROJECTION else embed_dim


def head_widths(model, embed_dim: int) -> set[int]:
    """The widths a head of this model may have: D, and a ViT's width before its projection."""
    proj = _projection(model)
    return {embed_dim} | ({int(proj.shape[0])} if proj is not None else set())


@contextlib.contextmanager
def _without_projection(visual):
    """open_clip's ViT returns its pooled token unprojected while ``proj`` is None (its forward skips it)."""
    proj = visual.proj
    visual.proj = None
    try:
        yield
    finally:
        visual.proj = proj


def encode_image(model, images, head_input: str):
    """The image feature at ``head_input`` (resolved): ``encode_image``, without the projection for pre-projection."""
    if head_input != PRE_PROJECTION:
        return model.encode_image(images)
    with _without_projection(model.visual):
        return model.encode_image(images)


class FeatureModel:
    """A model whose ``encode_image`` gives the feature at a pre-projection head's input, for the code that
    encodes images through ``encode_image`` (pipeline/encode.py: extract, predict)."""

    def __init__(self, model, head_input: str):
        self.model, self.head_input = model, head_input

    def encode_image(self, images):
        return encode_image(self.model, images, self.head_input)


def feature_model(model, head_input: str):
    """``model`` itself for the projected embedding, else a ``FeatureModel`` reading ``head_input``."""
    return model if head_input != PRE_PROJECTION else FeatureModel(model, head_input)


def text_to_head(model, text, head_input: str):
    """Text features [K, D] as head weights at ``head_input`` (resolved): normalize(normalize(t) · Pᵀ) before
    a projection, normalize(t) on the embedding. Also maps new classes into a pre-projection store (predict)."""
    import torch.nn.functional as F

    text = F.normalize(text.float(), dim=-1)
    if head_input == PRE_PROJECTION:
        text = F.normalize(text @ model.visual.proj.detach().float().T.to(text.device), dim=-1)
    return text


def choose_per_class(keys, labels, n_max: int | None, seed: int) -> set:
    """The keys of at most ``n_max`` samples per class (None: all), drawn without replacement from each class's
    sorted keys by a generator seeded with (seed, class): the same choice whatever order the shards stream in."""
    import numpy as np

    by_class: dict[int, list] = {}
    for key, label in zip(keys, labels):
        by_class.setdefault(int(label), []).append(key)
    chosen = set()
    for label, members in by_class.items():
        members.sort()
        if n_max is not None and len(members) > n_max:
            picks = np.random.default_rng([seed, label]).choice(len(members), n_max, replace=False)
            members = [members[i] for i in picks]
        chosen.update(members)
    return chosen


def check_every_class(labels, num_classes: int, method: str) -> None:
    """A class without a train image has no mean and no probe row: refused in one line."""
    import torch

    counts = torch.bincount(labels.long(), minlength=num_classes)
    if (counts == 0).any():
        k = int((counts == 0).nonzero()[0])
        raise UserError(f"--head-init {method}: class {k} has no readable train image; use --head-init text")


def class_means(features, labels, num_classes: int):
    """[K, F] L2-normalised mean feature of each class."""
    import torch
    import torch.nn.functional as F

    check_every_class(labels, num_classes, "class-mean")
    x = features.double()
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels.long(), x)
    counts = torch.bincount(labels.long(), minlength=num_classes).to(x)
    return F.normalize(sums / counts[:, None], dim=-1).float()


def register(cls):
    REGISTRY[cls.name] = cls()
    return cls


class HeadInit:
    """How the head's weights start. ``weights`` gets two callables and calls only what it needs:
    ``text()`` → [K, F] text weights (``text_to_head``), ``samples()`` → (features [N, F], labels [N]) of
    the chosen train images at the head's input."""

    name: str
    help: str
    needs_images = False  # reads train images (the data pass of stages/phase_a/head_init.py)

    def weights(self, text: Callable, samples: Callable, num_classes: int):
        raise NotImplementedError


@register
class TextInit(HeadInit):
    name = "text"
    help = "the class prompts' text features (LIFT's text_feat)"

    def weights(self, text, samples, num_classes):
        return text()


@register
class ClassMeanInit(HeadInit):
    name = "class-mean"
    help = "each class's mean train-image feature (LIFT's class_mean)"
    needs_images = True

    def weights(self, text, samples, num_classes):
        return class_means(*samples(), num_classes)


@register
class LinearProbeInit(HeadInit):
    name = "linear-probe"
    help = "a class-balanced logistic-regression probe on those features (LIFT's linear_probe)"
    needs_images = True

    def weights(self, text, samples, num_classes):
        import torch.nn.functional as F

        from pipeline.probe import linear_probe

        features, labels = samples()
        check_every_class(labels, num_classes, self.name)
        return F.normalize(linear_probe(features, labels, num_classes), dim=-1).float()


def head_init(name: str) -> HeadInit:
    if name not in REGISTRY:
        raise UserError(f"--head-init {name}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


HEAD_INITS = tuple(REGISTRY)
HEAD_INIT_HELP = ("How --classifier head's weights start: " + "; ".join(f"{n}: {m.help}" for n, m in REGISTRY.items())
                  + ". The image ones use at most --head-init-shots eval-transform train images per class.")
