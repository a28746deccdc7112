"""Synthetic cached features at any size: class-conditional Gaussians with long-tailed class counts.

Timing depends on the shapes, not on what the features mean, so the benchmarks generate stores of
ImageNet-LT size (115,846 × 1024, 1,000 classes) and beyond instead of extracting them. One thing
about the values does matter: like CLIP's, a feature's cosine with its class text is about 0.3 and
with other classes about 0, so logits (scale 100) spread over tens, not hundreds. Far-apart logits
put log-softmax outputs below −87, where the backward's exp takes a ~15× slower path on CPU.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_LT = {"n": 115_846, "classes": 1000, "dim": 1024, "test_per_class": 50}  # RN50 features
IMBALANCE = 256.0  # ImageNet-LT's 1280 / 5
COSINE = 0.3  # a CLIP image feature's typical cosine with its own class text


def lt_counts(n: int, num_classes: int, imbalance: float = IMBALANCE) -> np.ndarray:
    """Exponential counts ∝ ρ^(−i/(K−1)) summing to exactly ``n`` (largest remainder), each ≥ 1."""
    if n < num_classes:
        raise ValueError(f"{n} samples cannot give each of {num_classes} classes one")
    share = imbalance ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    exact = n * share / share.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
    while counts.min() < 1:  # a class rounded to 0 takes one sample from the largest class
        counts[counts.argmin()] += 1
        counts[counts.argmax()] -= 1
    return counts


def _means(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def features(counts, dim: int, seed: int = 0, split: int = 0, chunk: int = 65536):
    """(features [Σcounts, dim] float16, labels int64), rows shuffled; ``split`` varies the draw, not the classes."""
    means = _means(len(counts), dim, seed)
    gen = torch.Generator().manual_seed(seed * 1000 + split + 1)
    labels = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    labels = labels[torch.randperm(len(labels), generator=gen)]
    feats = torch.empty(len(labels), dim, dtype=torch.float16)
    for i in range(0, len(labels), chunk):  # in chunks: a float32 temporary of 1M × 1024 would take 4 GB
        y = labels[i:i + chunk]
        noise = torch.randn(len(y), dim, generator=gen) / dim ** 0.5  # nearly unit, nearly orthogonal to the means
        feats[i:i + chunk] = 10 * (COSINE * means[y] + (1 - COSINE ** 2) ** 0.5 * noise)
    return feats, labels


def text_embeddings(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[K, dim] float32, L2-normalised, near the class means."""
    noise = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed + 7))
    return F.normalize(_means(num_classes, dim, seed) + 0.05 * noise / dim ** 0.5, dim=1)


def lt_split(n: int, num_classes: int, dim: int, seed: int = 0):
    """(features, labels, text) of a long-tailed train split."""
    return (*features(lt_counts(n, num_classes), dim, seed), text_embeddings(num_classes, dim, seed))


def write(path, splits: dict, text: torch.Tensor):
    """A feature store at ``path`` holding ``splits`` {name: (features, labels)}; train must be one."""
    from store.feature_writer import write_store

    k = len(text)
    return write_store(path, image={s: f.numpy() for s, (f, _) in splits.items()},
                       labels={s: y.numpy() for s, (_, y) in splits.items()}, keys=None, text_embeddings=text.numpy(),
                       classnames=[f"class {c}" for c in range(k)], logit_scale=100.0,
                       train_class_counts=np.bincount(splits["train"][1].numpy(), minlength=k), overwrite=True)
