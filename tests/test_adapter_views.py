"""Phase B on augmented train views (`extract --train-views`): every draw reads one of the sample's views."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from stages.adapter import TrainConfig, Views, fill_epoch_views, fit, train_adapter
from store.features import FeatureStore
from store.feature_writer import write_store

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = TrainConfig(batch_size=64, epochs=3, select="last")


def store_with_views(path, lt_store, views_of) -> FeatureStore:
    """A copy of ``lt_store`` whose train split has the views ``views_of(train features)`` [V, N, D]."""
    src = FeatureStore.open(lt_store)
    train, ytrain = src.features("train")
    test, ytest = src.features("test")
    return write_store(path, image={"train": train, "test": test}, labels={"train": ytrain, "test": ytest},
                       keys=None, text_embeddings=src.text_embeddings(), classnames=src.classnames,
                       logit_scale=src.logit_scale, train_class_counts=src.train_class_counts,
                       meta={"model": "synthetic"}, views={"train": views_of(train)})


def weights(blob) -> dict:
    return blob["state_dict"]


def test_views_all_needs_a_store_with_views(lt_store, tmp_path):
    with pytest.raises(UserError, match=r"^--views all: .* --train-views V"):
        train_adapter(lt_store, tmp_path / "a.pt", TrainConfig(views="all", **{"batch_size": 64}))


def test_identical_views_train_exactly_like_the_features(lt_store, tmp_path):
    """Views that all equal the eval feature give the very same adapter: the sampler's draws do not
    depend on the views (their own generator) and every draw's row is its sample's."""
    store = store_with_views(tmp_path / "same.zarr", lt_store, lambda f: np.stack([f, f, f]))
    plain = train_adapter(store.path, tmp_path / "plain.pt", TrainConfig(**{**CFG.__dict__, "views": "none"}))
    for budget, streamed in ((None, False), (0, True)):  # in memory, and streamed from the store
        blob = train_adapter(store.path, tmp_path / "views.pt", CFG, max_view_bytes=budget)
        assert (blob["views"], blob["num_views"], blob["views_streamed"]) == ("all", 3, streamed)
        for k, v in weights(plain).items():
            assert torch.equal(v, weights(blob)[k]), (budget, k)


def test_different_views_change_training(lt_store, tmp_path):
    rng = np.random.default_rng(0)
    store = store_with_views(tmp_path / "aug.zarr", lt_store,
                             lambda f: np.stack([f + 0.5 * rng.standard_normal(f.shape).astype(np.float32)
                                                 for _ in range(4)]))
    plain = train_adapter(store.path, tmp_path / "plain.pt", TrainConfig(**{**CFG.__dict__, "views": "none"}))
    aug = train_adapter(store.path, tmp_path / "aug.pt", CFG)
    w = "visual.linear.weight"
    assert aug["views"] == "all" and not torch.equal(weights(plain)[w], weights(aug)[w])
    assert all(np.isfinite(aug["losses"]))


def test_every_draw_takes_one_of_its_samples_views():
    """In memory: the row a draw reads is view v of its sample, v uniform over the V views."""
    n, v_count, dim = 50, 4, 3
    feats = torch.zeros(n, dim)
    # view v of sample i holds (i, v, 0): the row each draw read is visible in what the adapter sees
    stored = torch.stack([torch.stack([torch.full((n,), float(v)), torch.arange(n).float(), torch.zeros(n)], 1)
                          for v in range(v_count)])
    labels = torch.arange(n) % 5
    seen = []
    import stages.adapter.model as adapter_module

    original = adapter_module.CosineCrossEntropy.apply

    def spy(z, w, y, bias):
        seen.append(torch.cat([z.detach(), y[:, None].float()], 1))
        return original(z, w, y, bias)

    adapter_module.CosineCrossEntropy.apply = spy
    try:
        # λ = 0: the adapter is the identity, so z is exactly the row read
        fit(feats, labels, torch.eye(5, dim), 10.0, TrainConfig(lam=0.0, batch_size=10, epochs=20, select="last"),
            views=Views(v_count, stored.dtype, stored=stored))
    finally:
        adapter_module.CosineCrossEntropy.apply = original
    rows = torch.cat(seen)
    view, sample, target = rows[:, 0].long(), rows[:, 1].long(), rows[:, 3].long()
    assert torch.equal(labels[sample], target)  # the row read is the drawn sample's, scored against its label
    counts = torch.bincount(view, minlength=v_count).float()
    assert counts.min() > 0.8 * counts.mean()  # 1,000 draws over 4 views: each near 250


def test_streamed_epoch_gives_each_sample_one_of_its_views():
    n, v_count = 200, 5
    views = np.stack([np.stack([np.full(n, v), np.arange(n)], 1) for v in range(v_count)]).astype(np.float16)
    rows = torch.empty(n, 2, dtype=torch.float16)
    reads = []

    def read(v):
        reads.append(v)
        return views[v]

    fill_epoch_views(rows, Views(v_count, torch.float16, read=read), torch.Generator().manual_seed(0))
    assert torch.equal(rows[:, 1].long(), torch.arange(n))  # row i is sample i's
    picked = rows[:, 0].long()
    assert set(picked.tolist()) == set(range(v_count)) and sorted(reads) == list(range(v_count))  # each view read once
