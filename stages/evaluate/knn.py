"""A kNN cache classifier over the train features, fused with the adapter logits; and stage `neighbors`.

Neither the paper nor the official code has this. The cache holds the train features, adapted by
the visual adapter (when there is one) and L2-normalised. For a query, its k nearest train samples
by cosine (an exact inner-product faiss index) vote for their classes with weight exp(−β(1 − cos)),
each vote divided by its class's train count^γ (γ > 0 tempers the many head-class neighbours), and
α times the votes are added to the adapter logits (`evaluate --knn-k/alpha/beta/gamma`). Tip-Adapter
(Zhang et al. 2022) uses the same affinity over every train sample; keeping k neighbours makes it
affordable on ImageNet-LT.

The index lives on the GPU when faiss sees one and on the CPU otherwise; both are exact, so they
agree up to float rounding and the order of ties at the k-th neighbour.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.runtime import pick_device
from stages.adapter import Adapter, embed_all, load_adapter
from stages.evaluate.config import EvaluateConfig, NeighborsConfig


def search(database: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines [Q, k], train indices [Q, k]) of the ``k`` largest inner products, best first."""
    import faiss

    db = np.ascontiguousarray(database.detach().float().cpu().numpy())
    index = faiss.IndexFlatIP(db.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    sims, idx = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), min(k, len(db)))
    return torch.from_numpy(sims), torch.from_numpy(idx)


def cache_logits(sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, train_counts: torch.Tensor,
                 beta: float, gamma: float) -> torch.Tensor:
    """[Q, K] class votes of the neighbours found by ``search`` (CPU tensors)."""
    classes = train_labels[idx]
    votes = torch.exp(-beta * (1 - sims))
    if gamma:
        votes = votes / train_counts[classes].double().pow(gamma).float()
    return torch.zeros(len(idx), len(train_counts)).scatter_add_(1, classes, votes)


def knn_logits(model: Adapter, store, queries: torch.Tensor, cfg: EvaluateConfig, device) -> torch.Tensor:
    """The cache's α-weighted votes for the embedded ``queries``, on the CPU."""
    feats, labels = store.features("train", device=device)
    sims, idx = search(embed_all(model, feats), queries, cfg.knn_k)
    counts = torch.from_numpy(store.train_class_counts)
    return cfg.knn_alpha * cache_logits(sims, idx, labels.cpu(), counts, cfg.knn_beta, cfg.knn_gamma)


def neighbors(cfg: NeighborsConfig) -> dict:
    """The ``cfg.k`` nearest train samples of sample ``cfg.key`` in ``cfg.split``, for error analysis."""
    from store.features import FeatureStore

    cfg.check()
    store = FeatureStore.open(cfg.features)
    dev = pick_device(cfg.device)
    model = load_adapter(cfg.adapter, store, cfg.features).to(dev)
    hits = np.flatnonzero(store.keys(cfg.split) == cfg.key)
    if len(hits) == 0:
        raise UserError(f"--key {cfg.key}: no such sample in split '{cfg.split}' of {cfg.features}")
    feats, labels = store.features(cfg.split)
    query = embed_all(model, torch.from_numpy(feats[hits[:1]]).to(dev))
    with torch.no_grad():
        scores = (query @ model.classifier(store.text_embeddings(device=dev)).T)[0]
    train_feats, train_labels = store.features("train", device=dev)
    sims, idx = search(embed_all(model, train_feats), query, cfg.k)
    train_keys, names = store.keys("train"), store.classnames
    label, pred = int(labels[hits[0]]), int(scores.argmax())
    rows = [{"rank": r + 1, "key": str(train_keys[i]), "class": names[int(train_labels[i])],
             "label": int(train_labels[i]), "cosine": float(s)}
            for r, (s, i) in enumerate(zip(sims[0].tolist(), idx[0].tolist()))]
    return {"key": cfg.key, "split": cfg.split, "label": label, "class": names[label], "predicted": pred,
            "predicted_class": names[pred], "neighbors": rows}
