"""Logits → the metrics `evaluate` and `sweep` report: accuracy by shot group and calibration.

Metrics, all in percent:
- ``top1`` / ``top5`` over the samples of the split.
- ``many`` / ``medium`` / ``few``: BALLAD's (OLTR's) ``shot_acc``: per-class accuracy first, then the
  mean over the classes whose train count is > ``many`` (many), < ``few`` (few) or in between
  (medium). Only classes with samples in the split count; a group without one is ``null`` in
  metrics.json, where the official code reports 0 (it appends a 0 to an empty group), which would
  read as a measured accuracy.
- ``ece``: expected calibration error of the max softmax probability over 15 equal-width bins
  (Guo et al. 2017), Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|.
- ``taxonomy`` (only for a store that records one, as iNaturalist's): top-1 at each coarser level,
  finest first (genus … kingdom), in ``taxonomy_accuracy``.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.shots import FEW, MANY, group_means
from stages.adapter import Adapter, embed_all
from store.shards import TAXONOMY_LEVELS, Taxonomy

ECE_BINS = 15


def shot_accuracy(pred: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, many: int = MANY,
                  few: int = FEW) -> tuple[dict, np.ndarray, np.ndarray]:
    """(group → mean per-class accuracy or None, per-class accuracy [K] (NaN: untested), test counts [K])."""
    k = len(train_counts)
    test_counts = np.bincount(labels, minlength=k)
    correct = np.bincount(labels, weights=(pred == labels), minlength=k)
    with np.errstate(invalid="ignore"):
        acc = 100 * correct / test_counts
    return group_means(acc, test_counts > 0, train_counts, many, few), acc, test_counts


def calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE in percent; bin b holds confidences in (b/bins, (b+1)/bins]."""
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    hits = np.bincount(which, weights=correct.astype(float), minlength=bins)
    return float(100 * np.abs(hits - np.bincount(which, weights=conf, minlength=bins)).sum() / len(conf))


def taxonomy_accuracy(pred: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy) -> dict[str, float]:
    """Level → top-1 in percent, finest level first: a prediction is right at a level when the predicted
    species and the true one share that level's name. Names alone are compared, not the lineage above
    them: a homonym (one genus name in two kingdoms) would count as one genus.

    Departs from LIFT+, whose code treats each level as a separate dataset (a classifier trained and
    scored over genera, say): here the one species classifier is scored at every level, so the numbers
    say how far off its mistakes are, from the same logits, at no extra training."""
    found = {}
    for level in reversed(TAXONOMY_LEVELS):
        if level in taxonomy:
            code = np.unique(np.asarray(taxonomy[level], dtype=str), return_inverse=True)[1]
            found[level] = float(100 * np.mean(code[pred] == code[labels]))
    return found


def score(logits: torch.Tensor, labels: np.ndarray, train_counts: np.ndarray, many: int = MANY, few: int = FEW,
          taxonomy: Taxonomy | None = None) -> dict:
    """Metrics plus the per-class and top-5 arrays the report files need; ``taxonomy`` (the store's, or
    None) adds the coarser levels' top-1 as ``taxonomy``."""
    probs = logits.float().softmax(dim=1)
    top_p, top_c = probs.topk(min(5, probs.shape[1]), dim=1)
    top_p, top_c = top_p.cpu().numpy(), top_c.cpu().numpy()
    pred = top_c[:, 0]
    groups, acc, test_counts = shot_accuracy(pred, labels, train_counts, many, few)
    metrics = {"top1": float(100 * np.mean(pred == labels)),
               "top5": float(100 * np.mean((top_c == labels[:, None]).any(1))), **groups,
               "ece": calibration_error(top_p[:, 0].astype(np.float64), pred == labels),
               "num_test": int(len(labels)), "num_classes": int(len(train_counts))}
    if taxonomy:
        metrics["taxonomy"] = taxonomy_accuracy(pred, labels, taxonomy)
    return {"metrics": metrics, "per_class": acc, "test_counts": test_counts, "top5": top_c, "scores": top_p}


def adapter_logits(model: Adapter, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Logits on the CPU for features already embedded by ``model``."""
    with torch.no_grad():
        return (emb @ model.classifier(text).T).cpu()


def view_logits(model: Adapter, views: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Test-time ensembling: the mean over views [T, N, D] of each view's class logits, on the CPU.
    Summed view by view, so memory holds one [N, K] matrix and a running sum, not T of them."""
    total = adapter_logits(model, embed_all(model, views[0]), text)
    for view in views[1:]:
        total += adapter_logits(model, embed_all(model, view), text)
    return total / len(views)
