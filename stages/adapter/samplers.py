"""On-device batch index samplers for Phase B (the paper's Table 8).

A sampler turns the train labels, already on the training device, into one epoch of sample indices at
a time, drawn with a ``torch.Generator`` on that device: no DataLoader, no per-sample Python. An
epoch is ``steps × batch_size`` draws, ``steps = ⌊N / batch_size⌋`` (at least 1), as in the official
loop. Classes without train samples are never drawn.

- ``class-aware`` (default): the authors' ClassAwareSampler (``num_samples_cls: 4``; the OLTR /
  decoupling-code sampler built on ``RandomCycleIter``). The classes form a shuffled cycle, reshuffled
  whenever it wraps; each visit takes the next 4 samples of its class at once, and each class's samples
  form their own shuffled cycle, reshuffled whenever it wraps. Both cycles' positions carry over from
  epoch to epoch (the iterators live in the sampler, which outlives the epoch); each epoch starts a new
  visit (a fresh generator per epoch), and a visit cut off by the end of an epoch has still used up its
  4 samples. This is the draw sequence of a loader that fetches batches on demand. The authors' loop
  breaks after ⌊N / 512⌋ steps while its DataLoader (12 workers) has already drawn a few dozen batches
  ahead; those draws advance the cycles and are thrown away. We do not model them: they change only
  where in the cycles each epoch starts.
- ``class-balanced``: a class uniformly, then one of its samples uniformly, with replacement (paper
  §3.2, q_j = 1/K): the i.i.d. version of the same balance.
- ``sqrt``: class probability ∝ √n_c (Mahajan et al. 2018), then a sample uniformly.
- ``instance``: a fresh permutation each epoch, like the plain shuffled loader.
- ``progressive``: class probability (1 − t/T)·n_c/N + (t/T)/K at epoch t of T (Kang et al. 2020),
  the paper's "mix-balanced".

Each sampler is one entry of ``SAMPLERS`` (``@register``): a function that, given the ``EpochSampler``
(labels, counts, generator), returns its ``draw(n, t, total)`` of n sample indices for epoch t of T; its
name is a ``--sampler`` choice (stages/adapter/config.py reads them). So that the config reads
the names without torch, torch is imported inside the functions.
"""
from __future__ import annotations

from typing import Callable

from pipeline.errors import UserError

VISIT = 4  # consecutive draws per class visit in the authors' ClassAwareSampler

SAMPLERS: dict[str, Callable] = {}


def register(name: str):
    """Adds the decorated function (``EpochSampler`` → ``draw(n, t, total)``) to ``SAMPLERS`` as ``name``."""
    def add(make):
        SAMPLERS[name] = make
        return make
    return add


class EpochSampler:
    """One epoch of ``steps × batch_size`` draws at a time, by the registered sampler ``name``."""

    def __init__(self, name: str, labels, num_classes: int, batch_size: int, generator):
        import torch

        if name not in SAMPLERS:
            raise UserError(f"--sampler {name}: choose one of {', '.join(SAMPLERS)}")
        self.labels, self.gen = labels, generator
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        self.present = (self.counts > 0).to(torch.float64)
        self.steps = max(1, len(labels) // batch_size)
        self.batch_size = batch_size
        self.draw = SAMPLERS[name](self)

    def epoch(self, t: int, total: int):
        """Indices for epoch ``t`` of ``total`` as a [steps, batch_size] tensor on the labels' device.

        Successive calls continue the ``class-aware`` cycles, so call it once per epoch, in order.
        """
        return self.draw(self.steps * self.batch_size, t, total).view(self.steps, self.batch_size)


@register("instance")
def instance(s: EpochSampler):
    import torch

    def draw(n: int, t: int, total: int):
        perm = torch.randperm(len(s.labels), generator=s.gen, device=s.labels.device)
        return perm.repeat(n // len(perm) + 1)[:n]  # batch > N: wrap around like a repeated loader
    return draw


@register("class-aware")
def class_aware(s: EpochSampler):
    import torch

    sizes = s.counts[s.counts > 0]  # the cycles run over the classes that have samples
    class_cycle = Cycles(torch.arange(len(sizes), device=s.labels.device), sizes.new_tensor([len(sizes)]), s.gen)
    sample_cycles = Cycles(s.order, sizes, s.gen)

    def draw(n: int, t: int, total: int):
        visits = -(-n // VISIT)
        cls = class_cycle.take(class_cycle.sizes.new_tensor([visits]))  # class (cycle group) per visit
        per_class = torch.bincount(cls, minlength=len(sample_cycles.sizes))
        samples = sample_cycles.take(VISIT * per_class)  # class by class, each in draw order
        # the r-th visit of a class this epoch takes that class's draws VISIT·r … VISIT·r + VISIT − 1
        by_class = torch.argsort(cls, stable=True)
        rank = torch.empty_like(cls)
        first_visit = torch.cumsum(per_class, 0) - per_class
        rank[by_class] = torch.arange(visits, device=cls.device) - first_visit[cls[by_class]]
        first = VISIT * (first_visit[cls] + rank)
        return samples[(first[:, None] + torch.arange(VISIT, device=cls.device)).flatten()[:n]]
    return draw


def by_class(probs: Callable):
    """A sampler that draws a class from ``probs(sampler, t, total)`` [K] (float64), then one of its samples
    uniformly, every draw independent (with replacement)."""
    def make(s: EpochSampler):
        import torch

        def draw(n: int, t: int, total: int):
            classes = torch.multinomial(probs(s, t, total), n, replacement=True, generator=s.gen)
            # float64: a float32 draw times a large count can round up to the count itself
            u = torch.rand(n, generator=s.gen, device=classes.device, dtype=torch.float64)
            return s.order[s.offsets[classes] + (u * s.counts[classes]).long()]
        return draw
    return make


def balanced(s: EpochSampler):
    return s.present / s.present.sum()


register("class-balanced")(by_class(lambda s, t, total: balanced(s)))
register("sqrt")(by_class(lambda s, t, total: s.counts.double().sqrt() / s.counts.double().sqrt().sum()))
register("progressive")(by_class(lambda s, t, total: (1 - t / total) * s.counts.double() / s.counts.double().sum()
                                 + (t / total) * balanced(s)))


class Cycles:
    """Groups of items, each drawn as a shuffled cycle that is reshuffled whenever it wraps.

    One ``RandomCycleIter`` of the authors' code per group, for all groups at once: ``take`` returns
    the next ``counts[g]`` items of every group ``g`` and remembers where each group stopped. As in
    ``RandomCycleIter``, a group starts exhausted, so its first draw already shuffles.
    """

    def __init__(self, items: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator):
        """``items``: the groups' items one group after another; ``sizes``: each group's item count (> 0)."""
        import torch

        self.items, self.sizes, self.gen = items, sizes, generator
        self.starts = torch.cumsum(sizes, 0) - sizes
        groups = torch.arange(len(sizes), device=sizes.device)
        self.group = torch.repeat_interleave(groups, sizes, output_size=len(items))  # group of each item slot
        self.perm = items.clone()  # each group's current cycle order
        self.pos = sizes.clone()  # items of the current cycle already drawn

    def take(self, counts: torch.Tensor) -> torch.Tensor:
        """The next ``counts[g]`` items of each group ``g``: group 0's in draw order, then group 1's, …"""
        import torch

        size, dev = self.sizes, self.sizes.device
        groups = torch.arange(len(size), device=dev)
        fresh = ((self.pos + counts - 1) // size).clamp_min(0)  # cycles that begin during this take
        # every group's stream: its current cycle, then its fresh cycles, all blocks laid end to end
        span = (1 + fresh) * size
        first = torch.cumsum(span, 0) - span
        g = torch.repeat_interleave(groups, span, output_size=int(span.sum()))
        slot = torch.arange(len(g), device=dev) - first[g]
        cycle, element = slot // size[g], slot % size[g]
        source = torch.where(cycle == 0, self.perm[self.starts[g] + element], self.items[self.starts[g] + element])
        # shuffle within each fresh cycle: random keys, then stably by block; the current cycle keeps its
        # order (its keys rise with the element); float64 keys, as float32 ones would now and then tie
        key = torch.rand(len(g), generator=self.gen, device=dev, dtype=torch.float64)
        key = torch.where(cycle == 0, element.double() / size[g], key)
        block = (torch.cumsum(1 + fresh, 0) - (1 + fresh))[g] + cycle
        order = torch.argsort(key)
        stream = source[order[torch.argsort(block[order], stable=True)]]
        # the draws: positions pos .. pos + counts − 1 of each group's stream
        d = torch.repeat_interleave(groups, counts, output_size=int(counts.sum()))
        within = torch.arange(len(d), device=dev) - (torch.cumsum(counts, 0) - counts)[d]
        drawn = stream[first[d] + self.pos[d] + within]
        # each group continues in its last cycle
        last = first[self.group] + fresh[self.group] * size[self.group]
        self.perm = stream[last + torch.arange(len(self.items), device=dev) - self.starts[self.group]]
        self.pos = self.pos + counts - fresh * size
        return drawn
