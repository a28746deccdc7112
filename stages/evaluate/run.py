"""Stage `evaluate`: accuracy by shot group and calibration of an adapter, or of the store as it is; for
a store that records its dataset's taxonomy (iNaturalist's), also top-1 at each coarser level.

The store and the adapter are read, the split's logits computed, the metrics scored (score.py) and the
report files written (files.py), in that order.

Two optional, additive changes to the logits, neither in the paper nor the official code: the kNN
cache of knn.py and post-hoc logit adjustment (Menon et al. 2021), logits − τ·log π with π the train
class prior (a class without train samples counts as one sample).

``tta="mean"`` is LIFT's test-time ensembling, not BALLAD's (the authors score the centre crop alone,
our default): the class logits of each of the store's test-time views (`extract --test-views`) after
the adapter, averaged. The kNN cache still looks up the eval-transform feature of each sample.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.prior import log_prior
from pipeline.runtime import pick_device
from stages.adapter import embed_all, load_adapter
from stages.evaluate.files import write_report
from stages.evaluate.knn import knn_logits
from stages.evaluate.score import adapter_logits, score, view_logits
from stages.evaluate.config import EvaluateConfig


def evaluate(cfg: EvaluateConfig) -> dict:
    """Score ``cfg.split`` and write metrics.json, per_class.csv, predictions.npz and per_class.png to ``cfg.out``."""
    from store.features import FeatureStore

    cfg.check()
    store = FeatureStore.open(cfg.features)
    views = store.tta_mode(cfg.split)  # also refuses a split the store lacks
    if cfg.tta == "mean" and views is None:
        raise UserError(f"--tta mean: split '{cfg.split}' of {cfg.features} has no test-time views; re-extract with "
                        f"`ballad-pipe extract … --test-views five-crop` (or flip, ten-crop)")
    dev = pick_device(cfg.device)
    model = load_adapter(cfg.adapter, store, cfg.features).to(dev)
    feats, labels = store.features(cfg.split, device=dev)
    logits = split_logits(cfg, store, model, feats, dev)
    labels, counts = labels.cpu().numpy(), store.train_class_counts
    result = score(logits, labels, counts, cfg.many, cfg.few, store.meta.get("taxonomy"))
    result["metrics"].update(tta=cfg.tta, tta_views=views if cfg.tta == "mean" else None)
    write_report(Path(cfg.out), result, store.classnames, counts, store.keys(cfg.split), labels, cfg.many, cfg.few)
    return result["metrics"]


def split_logits(cfg: EvaluateConfig, store, model, feats: torch.Tensor, dev) -> torch.Tensor:
    """[N, K] logits of the split's features ``feats`` on the CPU: the adapter's (averaged over views with ``--tta mean``), plus
    the kNN cache's votes and minus the τ-scaled log prior when those are on."""
    text = store.text_embeddings(device=dev)
    emb = embed_all(model, feats)
    if cfg.tta == "mean":
        logits = view_logits(model, store.tta_features(cfg.split, device=dev), text)
    else:
        logits = adapter_logits(model, emb, text)
    if cfg.knn_k:
        logits += knn_logits(model, store, emb, cfg, dev)
    if cfg.logit_adjust:
        logits -= cfg.logit_adjust * log_prior(store.train_class_counts)
    return logits
