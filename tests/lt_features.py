"""A synthetic long-tailed feature store for the Phase B and evaluation tests.

Class-conditional Gaussians around random unit means with long-tailed train counts (many, medium and
few classes under the default thresholds) and a balanced test split. The class text embeddings sit
near the class means, and the features of every class are pulled toward the mean of one head class:
the store's zero-shot classifier confuses tail classes with head ones, a linear bias that a balanced
adapter can learn to remove.
"""
from __future__ import annotations

import numpy as np

from store.feature_writer import write_store


def lt_counts(num_classes: int, max_count: int, imbalance: float) -> np.ndarray:
    return np.floor(max_count * imbalance ** (-np.arange(num_classes) / (num_classes - 1))).astype(np.int64)


def make_lt_store(path, num_classes=24, dim=16, max_count=400, imbalance=40.0, test_per_class=60,
                  noise=0.35, pull=1.1, head=6, seed=0, model="synthetic"):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    toward = np.where(np.arange(num_classes) < head, np.arange(num_classes), rng.integers(0, head, num_classes))
    text = means + 0.05 * rng.standard_normal((num_classes, dim))
    counts = lt_counts(num_classes, max_count, imbalance)

    def draw(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        feats = means[labels] + pull * means[toward[labels]] + noise * rng.standard_normal((len(labels), dim))
        return (2.0 * feats).astype(np.float32), labels  # unnormalised, like CLIP's projected embeddings

    (train, ytrain), (test, ytest) = draw(counts), draw(np.full(num_classes, test_per_class))
    return write_store(path, image={"train": train, "test": test}, labels={"train": ytrain, "test": ytest},
                       keys=None, text_embeddings=text, classnames=[f"class {c}" for c in range(num_classes)],
                       logit_scale=100.0, train_class_counts=counts, meta={"model": model})

