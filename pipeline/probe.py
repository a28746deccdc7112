"""A linear probe in torch: LIFT's ``init_head_linear_probe`` objective without scikit-learn.

LIFT's code fits ``sklearn.linear_model.LogisticRegression(solver="lbfgs", max_iter=100, penalty="l2",
class_weight="balanced")`` (C = 1, an unpenalised intercept, the multinomial loss for K > 2) on the raw
features and keeps ``coef_``. ``objective`` is that problem as scikit-learn writes it (≥ 1.1):

    (1 / Σ s_i) Σ_i s_i · CE(W x_i + b, y_i) + ||W||² / (2 C Σ s_i),   s_i = N / (K · N_{y_i})

(the balanced class weights; with them Σ s_i = N). It is minimised here by L-BFGS in float64 from
zero, with scipy's stopping rules as scikit-learn sets them (at most ``max_iter`` iterations, the largest
gradient entry at most ``tol``, 10 stored corrections, a strong-Wolfe line search). The objective is
strictly convex, so both reach the same W up to those tolerances; the iterates on the way differ.
Departure: for K = 2 scikit-learn fits one binary row (and LIFT's head would then not load); this
fits the K-row multinomial problem for any K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def objective(weights, bias, features, labels, sample_weights, c: float = 1.0):
    """The probe's loss at (W [K, F], b [K]) for features [N, F] and per-sample weights [N]."""
    ce = F.cross_entropy(features @ weights.T + bias, labels, reduction="none")
    total = sample_weights.sum()
    return (sample_weights * ce).sum() / total + (weights ** 2).sum() / (2 * c * total)


def balanced_weights(labels, num_classes: int):
    """scikit-learn's ``class_weight="balanced"`` per sample: N / (K · N_y) (every class present)."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return (len(labels) / (num_classes * counts))[labels]


def linear_probe(features, labels, num_classes: int, *, c: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-4) -> torch.Tensor:
    """The coefficient rows W [K, F] (float64, on the features' device) of the balanced L2 logistic regression."""
    x, y = features.detach().to(torch.float64), labels.detach().long().to(features.device)
    s = balanced_weights(y, num_classes)
    w = torch.zeros(num_classes, x.shape[1] + 1, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, max_eval=15000, tolerance_grad=tol,
                            tolerance_change=64 * torch.finfo(torch.float64).eps, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(w[:, :-1], w[:, -1], x, y, s, c)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w[:, :-1].detach()
