"""Stage `adapter`: BALLAD Phase B, a residual linear adapter trained on cached features.

The package: ``config`` (``TrainConfig`` and ``AdapterConfig``, torch-free), ``samplers`` (the sampler registry),
``model`` (the adapter, its fused loss kernel, scoring, loading the adapter file), ``train`` (``fit``,
``train_adapter``). Its public names are importable from ``stages.adapter`` itself; they load their
module on first use, so importing ``stages.adapter.config`` (the CLI) does not import torch.

The backbone is frozen in Phase B, so training never touches images: it reads the feature store.
f* = λ·A(f) + (1 − λ)·f, logits = s · norm(f*) · uᵀ with the store's L2-normalised class text
embeddings u and logit scale s, cross-entropy over the K classes (``--loss``: any loss of
pipeline/losses.py). The options and their defaults are ``TrainConfig``
(stages/adapter/config.py); the defaults are what the authors' code does:
- sampler: the authors' ClassAwareSampler (stages/adapter/samplers.py); ``--sampler`` offers the others.
- schedule: SGD (momentum 0.9, weight decay 5e-4) with the cosine stepped at the start of every epoch,
  as the authors call ``CosineAnnealingLR.step()``: epoch 1 runs at lr·(1 + cos(π/T))/2 and the last at
  lr 0, so the last epoch leaves the weights as they are. ``--schedule standard``: full lr first.
- model selection: the epoch with the best top-1 on the store's ``val`` split, as the authors keep
  (strictly better only: a tie keeps the earlier epoch); the last epoch when the store has no val split
  or with ``--select last``. Scoring val reads no random numbers, so the training run is the same either
  way; val is scored every epoch whenever the store has it, and the scores are saved. (The authors'
  best accuracy starts at 0, so a val top-1 of 0 in every epoch would keep their untrained adapter;
  here epoch 1.)
- form: the code's A(f) = W f without bias (``linear``); the paper's Eq. 5, ReLU(Wᵀf + b), is ``relu``.
- position (Table 6): ``text`` adapts the class text embeddings instead (u* = λ·A(u) + (1 − λ)·u,
  renormalised); ``both`` uses two separate adapters.
- W starts from nn.Linear's default initialisation, as in the code.
- inputs (``--views``): the authors run the frozen towers on a fresh train-transform view (crop, flip,
  colour jitter) of every image at every draw. A store extracted with ``--train-views V`` holds V such
  views per image, and every draw here takes one of them uniformly at random (``--views all``, the
  default when the store has them): the same distribution of inputs, from V samples of it per image
  instead of a new one per draw. The view indices come from their own generator, so the sampler draws the
  same samples with or without views. Without views (``--views none``, or a store extracted without
  them) every draw reads the image's one eval-transform feature: a departure from the method that
  matters most for the tail, whose few images are drawn hundreds of times.
Where we differ from the code:
- views that do not fit in memory (``views_budget``) are streamed: each epoch reads the V views once
  from the store and gives every sample one random view for the whole epoch, so a sample drawn twice in
  one epoch sees the same view twice (in memory, each draw has its own view).
- scale: the code multiplies by a fixed 100 (CLIP's learned scale); here the store's logit scale,
  which is that value for CLIP checkpoints.
- ``--loss`` other than ce (LIFT's logit-adjusted and the other long-tail losses of pipeline/losses.py;
  none in BALLAD's code) changes the training loss only; evaluation and the val scores use the plain
  logits.
- a non-finite loss stops the run with an error, and nothing is written. The loss is summed on the
  device (a CUDA graph cannot sync), so it is checked once per epoch, when the epoch's mean loss is read
  back, and the error names the epoch, not the step.
"""
from __future__ import annotations

import importlib

PUBLIC = {"model": ("Adapter", "CosineCrossEntropy", "embed_all", "load_adapter", "top1"),
          "samplers": ("EpochSampler",),
          "train": ("Fitted", "Views", "fill_epoch_views", "fit", "live_dir", "train_adapter", "training_data"),
          "config": ("AdapterConfig", "TrainConfig")}
MODULE_OF = {name: module for module, names in PUBLIC.items() for name in names}
__all__ = sorted(MODULE_OF)


def __getattr__(name: str):
    """``stages.adapter.<name>``: the public name from its module, imported on first use."""
    if name not in MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{MODULE_OF[name]}"), name)
