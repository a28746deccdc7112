"""Phase B's on-device samplers, the authors' ClassAwareSampler against a plain Python version of it."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from stages.adapter.samplers import VISIT, EpochSampler

# 5 classes with samples (500 down to 3) and one without: cycles of 5 classes, tail cycles of 3 samples
LABELS = torch.repeat_interleave(torch.arange(6), torch.tensor([500, 120, 40, 9, 3, 0]))
PRESENT = [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["class-aware", "class-balanced", "sqrt", "progressive", "instance"])
def test_sampler_class_frequencies(name):
    counts = torch.bincount(LABELS, minlength=6).double()
    expected = {"class-aware": (counts > 0).double(), "class-balanced": (counts > 0).double(), "sqrt": counts.sqrt(),
                "instance": counts, "progressive": counts}[name]  # progressive starts instance-balanced
    sampler = EpochSampler(name, LABELS, 6, 8, torch.Generator().manual_seed(0))
    drawn = torch.cat([sampler.epoch(0, 10).flatten() for _ in range(40)])
    share = torch.bincount(LABELS[drawn], minlength=6).double() / len(drawn)
    assert torch.allclose(share, expected / expected.sum(), atol=0.02)
    if name == "instance":  # one epoch is a permutation prefix: no sample twice
        assert len(torch.unique(sampler.epoch(0, 1))) == sampler.steps * 8
    if name == "progressive":  # ends class-balanced
        late = torch.cat([sampler.epoch(10, 10).flatten() for _ in range(40)])
        share = torch.bincount(LABELS[late], minlength=6).double() / len(late)
        assert torch.allclose(share[:5], torch.full((5,), 0.2, dtype=torch.float64), atol=0.02)


# ---------------------------------------------------------------- the authors' ClassAwareSampler
class PyCycle:
    """A shuffled cycle over ``items``, reshuffled when it wraps; starts exhausted, so the first draw shuffles."""

    def __init__(self, items, rng: random.Random):
        self.items, self.rng, self.i = list(items), rng, len(items) - 1

    def next(self):
        self.i += 1
        if self.i == len(self.items):
            self.i = 0
            self.rng.shuffle(self.items)
        return self.items[self.i]


def python_class_aware(labels: list[int], batch: int, epochs: int, seed: int) -> list[list[int]]:
    """The algorithm, one draw at a time: the cycles live across epochs, each epoch starts a new visit,
    a visit takes VISIT samples of its class at once (a visit cut off by the epoch's end still uses them)."""
    rng = random.Random(seed)
    classes = PyCycle(sorted(set(labels)), rng)
    samples = {c: PyCycle([i for i, y in enumerate(labels) if y == c], rng) for c in set(labels)}
    n = max(1, len(labels) // batch) * batch
    out = []
    for _ in range(epochs):
        epoch = []
        while len(epoch) < n:
            c = classes.next()
            epoch += [samples[c].next() for _ in range(VISIT)]
        out.append(epoch[:n])
    return out


def torch_class_aware(batch: int, epochs: int, seed: int) -> list[list[int]]:
    sampler = EpochSampler("class-aware", LABELS, 6, batch, torch.Generator().manual_seed(seed))
    return [sampler.epoch(t, epochs).flatten().tolist() for t in range(epochs)]


def statistics(epochs: list[list[int]]) -> tuple[dict, dict]:
    """(exact properties, equal for any correct implementation; rates, that agree only in distribution).

    Every VISIT draws from an epoch's start are one visit; a visit uses VISIT samples of its class even
    when the epoch's end cuts it off, so the k-th visit of class c uses c's samples VISIT·k … VISIT·k + 3.
    """
    labels = LABELS.tolist()
    members = {c: sorted(i for i, y in enumerate(labels) if y == c) for c in PRESENT}
    runs_one_class, visits, spread = True, [], []
    used = Counter()
    position = {c: {} for c in PRESENT}  # class → place in its sample stream → sample drawn there
    for epoch in epochs:
        epoch_visits = []
        for start in range(0, len(epoch), VISIT):
            run = epoch[start:start + VISIT]
            c = labels[run[0]]
            runs_one_class &= all(labels[i] == c for i in run)
            position[c].update({used[c] + j: i for j, i in enumerate(run)})
            used[c] += VISIT
            epoch_visits.append(c)
        visits += epoch_visits
        per_class = Counter(epoch_visits).values()
        spread.append(max(per_class) - min(per_class))
    class_cycles = [visits[i:i + len(PRESENT)] for i in range(0, len(visits) - len(PRESENT) + 1, len(PRESENT))]
    sample_cycles = {c: [[position[c][p] for p in range(k, k + len(members[c])) if p in position[c]]
                         for k in range(0, used[c] - len(members[c]) + 1, len(members[c]))] for c in PRESENT}
    stats = {"runs of one class": runs_one_class,
             "every class once per class cycle": all(sorted(cycle) == PRESENT for cycle in class_cycles),
             "no sample twice per sample cycle": all(len(set(cycle)) == len(cycle)
                                                     for c in PRESENT for cycle in sample_cycles[c]),
             "every sample in a whole cycle": all(sorted(cycle) == members[c] for c in PRESENT
                                                  for cycle in sample_cycles[c] if len(cycle) == len(members[c]))}
    tail = [cycle for cycle in sample_cycles[4] if len(cycle) == 3]
    rates = {"class cycle repeats": sum(a == b for a, b in zip(class_cycles, class_cycles[1:])) / len(class_cycles),
             "first of class cycle": [sum(cycle[0] == c for cycle in class_cycles) / len(class_cycles)
                                      for c in PRESENT],
             "tail cycle repeats": sum(a == b for a, b in zip(tail, tail[1:])) / len(tail),
             "first of tail cycle": [sum(cycle[0] == i for cycle in tail) / len(tail) for i in members[4]],
             "visits of the most minus the least visited class": sum(spread) / len(spread)}
    return stats, rates


# 24: 28 steps, 168 visits an epoch (not a multiple of the 5 classes); 8: 84 steps;
# 10: 67 steps of 10, so every epoch's last visit is cut off after 2 of its 4 draws
@pytest.mark.parametrize("batch", [24, 8, 10])
def test_class_aware_matches_python_reimplementation(batch):
    epochs = 40
    ours, rates = statistics(torch_class_aware(batch, epochs, seed=0))
    theirs, their_rates = statistics(python_class_aware(LABELS.tolist(), batch, epochs, seed=0))
    assert ours == theirs
    # the properties hold (equality is not both failing alike), over epoch boundaries: both cycles carry over
    assert all(ours.values())
    # reshuffled at every wrap: consecutive cycles repeat at chance (1/5! for classes, 1/3! for the tail's
    # 3 samples), and every class / sample starts a cycle equally often
    for key, value in rates.items():
        assert value == pytest.approx(their_rates[key], abs=0.35 if key.startswith("visits") else 0.05), key
    assert rates["class cycle repeats"] < 0.05 and rates["tail cycle repeats"] == pytest.approx(1 / 6, abs=0.05)


def test_class_aware_is_seeded():
    assert torch_class_aware(24, 3, seed=0) == torch_class_aware(24, 3, seed=0)
    assert torch_class_aware(24, 3, seed=0) != torch_class_aware(24, 3, seed=1)


def test_sampler_choices_are_the_registry():
    from stages.adapter.samplers import SAMPLERS
    from stages.adapter.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["sampler"].metadata["choices"] == tuple(SAMPLERS)
