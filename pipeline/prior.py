"""The log of the train class prior: logit adjustment (Menon et al. 2021; LIFT trains with it, τ = 1).

One definition for the training losses that shift the logits by it (pipeline/losses.py: logit-adjusted,
balanced-softmax, LADE; Phase A and Phase B alike) and for evaluate's post-hoc ``--logit-adjust``.
"""
from __future__ import annotations

import torch


def log_prior(class_counts) -> torch.Tensor:
    """log of the train class prior from per-class counts (a list, array or tensor, which keeps its
    device), float32; a class without train samples counts as one, so its log-prior stays finite."""
    counts = torch.as_tensor(class_counts).double().clamp_min(1)
    return (counts / counts.sum()).log().float()
