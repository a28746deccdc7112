"""On-device batch index samplers for Phase B (the paper's Table 8).

A sampler turns the train labels, already on the training device, into one epoch of sample indices at
a time, drawn with a ``torch.Generator`` on that device: no DataLoader, no per-sample Python. An
epoch is ``steps × batch_size`` draws, ``steps = ⌊N / batch_size⌋`` (at least 1), as in the official
loop. Classes without train samples are never drawn.

- ``class-balanced`` (default): a class uniformly, then one of its samples uniformly, with
  replacement (paper §3.2, Eq. q_j = 1/K).
- ``class-aware``: the official code's ClassAwareSampler: classes visited in a reshuffled cycle,
  4 consecutive samples per visit, each class's samples cycled in shuffled order. The official
  iterator reshuffles a class whenever it wraps; here the order is reshuffled once per epoch.
- ``sqrt``: class probability ∝ √n_c (Mahajan et al. 2018), then a sample uniformly.
- ``instance``: a fresh permutation each epoch, like the plain shuffled loader.
- ``progressive``: class probability (1 − t/T)·n_c/N + (t/T)/K at epoch t of T (Kang et al. 2020),
  the paper's "mix-balanced".
"""
from __future__ import annotations

import torch

from pipeline.errors import UserError

SAMPLERS = ("class-balanced", "class-aware", "sqrt", "instance", "progressive")
VISIT = 4  # consecutive draws per class visit in the official ClassAwareSampler


class EpochSampler:
    def __init__(self, name: str, labels: torch.Tensor, num_classes: int, batch_size: int,
                 generator: torch.Generator):
        if name not in SAMPLERS:
            raise UserError(f"--sampler {name}: choose one of {', '.join(SAMPLERS)}")
        self.name, self.labels, self.gen = name, labels, generator
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        self.present = (self.counts > 0).to(torch.float64)
        self.steps = max(1, len(labels) // batch_size)
        self.batch_size = batch_size

    def epoch(self, t: int, total: int) -> torch.Tensor:
        """Indices for epoch ``t`` of ``total`` as a [steps, batch_size] tensor on the labels' device."""
        n = self.steps * self.batch_size
        if self.name == "instance":
            perm = torch.randperm(len(self.labels), generator=self.gen, device=self.labels.device)
            idx = perm.repeat(n // len(perm) + 1)[:n]  # batch > N: wrap around like a repeated loader
        elif self.name == "class-aware":
            idx = self._class_aware(n)
        else:
            classes = torch.multinomial(self._class_probs(t, total), n, replacement=True, generator=self.gen)
            # float64: a float32 draw times a large count can round up to the count itself
            u = torch.rand(n, generator=self.gen, device=classes.device, dtype=torch.float64)
            idx = self.order[self.offsets[classes] + (u * self.counts[classes]).long()]
        return idx.view(self.steps, self.batch_size)

    def _class_probs(self, t: int, total: int) -> torch.Tensor:
        counts = self.counts.to(torch.float64)
        balanced = self.present / self.present.sum()
        if self.name == "class-balanced":
            return balanced
        if self.name == "sqrt":
            return counts.sqrt() / counts.sqrt().sum()
        mix = t / total
        return (1 - mix) * counts / counts.sum() + mix * balanced

    def _class_aware(self, n: int) -> torch.Tensor:
        dev = self.labels.device
        present = torch.nonzero(self.present).squeeze(1)
        visits = -(-n // VISIT)
        cycles = -(-visits // len(present))
        cycle = torch.rand(cycles, len(present), generator=self.gen, device=dev).argsort(dim=1)
        classes = present[cycle.flatten()[:visits]].repeat_interleave(VISIT)[:n]
        # a per-epoch shuffle within each class: sort random keys, then stably by class
        keys = torch.rand(len(self.labels), generator=self.gen, device=dev).argsort()
        shuffled = keys[torch.argsort(self.labels[keys], stable=True)]
        # the j-th visit of class c this epoch takes its (j mod n_c)-th shuffled sample
        by_class = torch.argsort(classes, stable=True)
        seen = torch.bincount(classes, minlength=len(self.counts))
        first = torch.cumsum(seen, 0) - seen
        rank = torch.empty_like(classes)
        rank[by_class] = torch.arange(n, device=dev) - first[classes[by_class]]
        return shuffled[self.offsets[classes] + rank % self.counts[classes]]
