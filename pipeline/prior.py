"""The train class prior of logit adjustment (Menon et al. 2021; LIFT trains with it, τ = 1).

One definition for Phase A (``phase-a --loss logit-adjusted``, stages/phase_a.py) and Phase B
(``adapter --loss logit-adjusted``, stages/adapter.py): the training logits become
logits + τ · log_prior(train class counts); evaluation uses the plain logits.
"""
from __future__ import annotations

import torch


def log_prior(class_counts) -> torch.Tensor:
    """log of the train class prior from per-class counts (a list, array or tensor, which keeps its
    device), float32; a class without train samples counts as one, so its log-prior stays finite."""
    counts = torch.as_tensor(class_counts).double().clamp_min(1)
    return (counts / counts.sum()).log().float()
