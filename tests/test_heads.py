"""Phase A's classifier head (issues 24, 25): LIFT's placement before the image projection (--head-input),
its initialisations (--head-init text|class-mean|linear-probe), and a pre-projection head through final.json,
extract, export and predict."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import UserError
from pipeline.heads import (HEAD_INITS, PRE_PROJECTION, PROJECTION, REGISTRY, choose_per_class, class_means,
                            encode_image, feature_dim, resolved_head_input)
from pipeline.models import create_model
from pipeline.peft import HEAD_KEY
from pipeline.probe import balanced_weights, linear_probe, objective
from pipeline.runtime import seed_everything
from pipeline.text import encode_text, tokenize_trimmed
from stages.phase_a.model import Towers, cosine_logits, text_head, train_step

CLASSES = ("red circle", "blue square", "green triangle")


def tiny(name: str = "ballad-tiny-vit"):
    seed_everything(0)
    bb = create_model(name)
    return bb, tokenize_trimmed(bb.tokenizer, [f"a photo of a {c}." for c in CLASSES])


def pixels(n: int = 5, seed: int = 1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registry_is_the_choices():
    from stages.phase_a.config import PhaseAConfig

    assert HEAD_INITS == tuple(REGISTRY) == ("text", "class-mean", "linear-probe")
    fields = PhaseAConfig.__dataclass_fields__
    assert fields["head_init"].metadata["choices"] == HEAD_INITS and fields["head_input"].default == PRE_PROJECTION


def test_pre_projection_text_head_gives_lifts_rescaled_zero_shot_logits(single_thread):
    bb, tokens = tiny()
    model, x, s = bb.model.eval(), pixels(), 25.0
    proj = model.visual.proj.detach()
    with torch.no_grad():
        h = encode_image(model, x, PRE_PROJECTION)
        v = model.encode_image(x)
        assert h.shape[1] == feature_dim(model, PRE_PROJECTION, bb.embed_dim) == proj.shape[0] != v.shape[1]
        assert torch.allclose(h @ proj, v, atol=1e-5)  # the feature just before the projection
        t = F.normalize(encode_text(model, tokens), dim=-1)
        head = text_head(model, tokens, head_input=PRE_PROJECTION)
        towers = Towers(model, head=head, head_input=PRE_PROJECTION).eval()
        got = cosine_logits(towers.image(x), towers.head, s)
        zero_shot = cosine_logits(v, t, s)  # the projection head's initial logits
        rescale = (v.norm(dim=1, keepdim=True) / h.norm(dim=1, keepdim=True)) / (t @ proj.T).norm(dim=1)
        assert torch.allclose(got, zero_shot * rescale, atol=1e-4)
        assert not torch.allclose(got, zero_shot, atol=1e-2)
        assert torch.allclose(cosine_logits(v, text_head(model, tokens), s), zero_shot, atol=1e-5)


def test_a_pre_projection_head_trains_without_the_projection(single_thread):
    bb, tokens = tiny()
    head = text_head(bb.model, tokens, head_input=PRE_PROJECTION)
    towers = Towers(bb.model, head=head, head_input=PRE_PROJECTION)
    y = torch.tensor([0, 1, 2, 0])
    train_step(towers, tokens, [(pixels(4), y)], 25.0)
    assert towers.head.grad is not None and towers.head.grad.abs().sum() > 0
    assert not bb.model.visual.proj.requires_grad and bb.model.visual.proj.grad is None
    assert bb.model.visual.ln_post.weight.grad.abs().sum() > 0  # what the head reads trains


def test_a_resnet_tower_reads_its_embedding_as_lifts_code_does():
    bb, tokens = tiny("ballad-tiny")
    assert resolved_head_input(bb.model, PRE_PROJECTION) == PROJECTION
    with torch.no_grad():
        t = F.normalize(encode_text(bb.model, tokens), dim=-1)
    assert torch.allclose(text_head(bb.model, tokens, head_input=PROJECTION), t)


def test_choose_per_class_is_seeded_capped_and_order_free():
    keys = [f"k{i:03d}" for i in range(40)]
    labels = [0] * 25 + [1] * 10 + [2] * 5
    chosen = choose_per_class(keys, labels, 8, seed=3)
    per_class = np.bincount([labels[keys.index(k)] for k in chosen])
    assert per_class.tolist() == [8, 8, 5]
    order = np.random.default_rng(0).permutation(40)
    assert choose_per_class([keys[i] for i in order], [labels[i] for i in order], 8, seed=3) == chosen
    assert choose_per_class(keys, labels, 8, seed=4) != chosen
    assert choose_per_class(keys, labels, None, seed=3) == set(keys)


def test_class_means_are_normalised_means_and_need_every_class():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, -2.0]])
    y = torch.tensor([0, 0, 1])
    got = class_means(x, y, 2)
    assert torch.allclose(got, torch.tensor([[2 / math.sqrt(8), 2 / math.sqrt(8)], [0.0, -1.0]]))
    with pytest.raises(UserError, match="^--head-init class-mean: class 2 has no readable train image"):
        class_means(x, y, 3)


def _root(f, lo: float, hi: float) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_linear_probe_reaches_the_hand_solved_optimum():
    # x = ±1 with labels 1 / 0: by symmetry b = 0 and W = [-w, w], and the objective is
    # log(1 + e^(-2w)) + w²/2, whose derivative -2 / (1 + e^(2w)) + w vanishes at the optimum.
    w = _root(lambda w: w - 2 / (1 + math.exp(2 * w)), 0.0, 2.0)
    got = linear_probe(torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0]), 2)
    assert torch.allclose(got, torch.tensor([[-w], [w]], dtype=torch.float64), atol=1e-4)  # to its stopping rule


def test_linear_probe_objective_is_the_balanced_l2_logistic_loss_and_is_minimised():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 18 + [1] * 9 + [2] * 3)
    s = balanced_weights(y, 3)
    assert torch.allclose(s[[0, 18, 29]], torch.tensor([30 / 54, 30 / 27, 30 / 9], dtype=torch.float64))
    W, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    z = (x @ W.T + b).numpy()
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(30), y.numpy()]
    by_hand = (s.numpy() * ce).sum() / 30 + (W.numpy() ** 2).sum() / 60
    assert objective(W, b, x, y, s).item() == pytest.approx(by_hand, rel=1e-12)
    coef = linear_probe(x, y, 3).requires_grad_(True)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch.optim.LBFGS([bias], max_iter=200, line_search_fn="strong_wolfe").step(
        lambda: (bias.grad.zero_() if bias.grad is not None else None, (l := objective(coef.detach(), bias, x, y, s))
                 .backward(), l)[2])
    loss = objective(coef, bias.detach(), x, y, s)
    loss.backward()
    assert coef.grad.abs().max() < 1e-4  # a stationary point of a strictly convex objective: its minimum


def test_linear_probe_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64) + F.one_hot(y, 6).double() * 1.5
    clf = sklearn.LogisticRegression(solver="lbfgs", max_iter=100, penalty="l2", class_weight="balanced").fit(x, y)
    ours = F.normalize(linear_probe(x, y, 3), dim=-1).numpy()
    theirs = clf.coef_ / np.linalg.norm(clf.coef_, axis=1, keepdims=True)
    assert np.allclose(ours, theirs, atol=1e-3)


# -- stage level: Phase A's initialisations, and a pre-projection head through extract, export, predict -----

def phase_a_config(data, out, **kw):
    from stages.phase_a.config import PhaseAConfig

    return PhaseAConfig(data=str(data), out=str(out), model="ballad-tiny-vit", optimizer="adamw", lr=1e-3,
                        weight_decay=0.05, workers=0, shuffle_buffer=50, batch_size=32, epochs=1,
                        schedule="standard", select="last", classifier="head", **kw)


def test_image_initialisations_read_at_most_the_shots_of_each_class(tiny_data, single_thread):
    from stages.phase_a.head_init import initial_head, train_samples
    from store.shards import load_dataset

    info = load_dataset(tiny_data)
    bb, _ = tiny()
    cfg = phase_a_config(tiny_data, "unused", head_init="class-mean", head_init_shots=2)
    urls = info.urls("train")
    tokens = tokenize_trimmed(bb.tokenizer, [info.template.format(c) for c in info.classnames])
    feats, labels = train_samples(cfg, bb, urls, PRE_PROJECTION, torch.device("cpu"))
    counts = info.split("train").class_counts
    assert torch.bincount(labels, minlength=30).tolist() == [min(2, c) for c in counts]
    assert feats.shape == (len(labels), 128)
    head, head_input = initial_head(cfg, bb, tokens, urls, torch.device("cpu"))
    assert head_input == PRE_PROJECTION and torch.allclose(head, class_means(feats, labels, 30), atol=1e-6)
    probe, _ = initial_head(phase_a_config(tiny_data, "unused", head_init="linear-probe", head_init_shots=2), bb,
                            tokens, urls, torch.device("cpu"))
    assert probe.shape == (30, 128) and torch.allclose(probe.norm(dim=1), torch.ones(30))
    assert not torch.allclose(probe, head, atol=1e-2)


def test_head_options_need_the_head_classifier(tiny_data, tmp_path):
    from stages.phase_a.config import PhaseAConfig

    for key, value in (("head_input", "projection"), ("head_init", "class-mean"), ("head_init_shots", 5)):
        with pytest.raises(UserError, match=f"^--{key.replace('_', '-')} {value}: applies to --classifier head only"):
            PhaseAConfig(data=str(tiny_data), model="ballad-tiny-vit", **{key: value}).check()


def test_phase_a_records_the_head_and_extract_stores_its_feature(tiny_data, tmp_path, single_thread):
    import zarr

    from stages.extract.run import extract
    from stages.phase_a.run import run_phase_a

    final = run_phase_a(phase_a_config(tiny_data, tmp_path / "run", head_init="class-mean", head_init_shots=3))
    meta = json.loads(final.with_suffix(".json").read_text())
    assert (meta["head_input"], meta["head_init"], meta["head_key"]) == (PRE_PROJECTION, "class-mean", HEAD_KEY)
    head = torch.load(final, weights_only=True)[HEAD_KEY]
    assert head.shape == (30, 128)
    extract(str(final), tiny_data, tmp_path / "s.zarr", splits=["test"], batch_size=64, workers=0)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root.attrs["head_input"] == PRE_PROJECTION and root.attrs["embed_dim"] == 128
    assert np.allclose(root["text/embeddings"][:], F.normalize(head.float(), dim=-1).numpy(), atol=1e-6)
    bad = json.loads(final.with_suffix(".json").read_text())
    final.with_suffix(".json").write_text(json.dumps({**bad, "head_input": "projection"}))
    with pytest.raises(UserError, match="its classifier head reads 128-d features, but its final.json says "
                                        "--head-input projection"):
        extract(str(final), tiny_data, tmp_path / "t.zarr", splits=["test"], batch_size=64, workers=0)


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    """A seed-0 ballad-tiny-vit with a random pre-projection head [30, 128], as Phase A writes one."""
    root = tmp_path_factory.mktemp("head")
    bb, _ = tiny()
    state = bb.model.state_dict()
    state[HEAD_KEY] = torch.randn(30, 128, generator=torch.Generator().manual_seed(2))
    torch.save(state, root / "final.pt")
    (root / "final.json").write_text(json.dumps({"model": "ballad-tiny-vit", "pretrained": None, "classifier": "head",
                                                 "head_key": HEAD_KEY, "head_input": PRE_PROJECTION,
                                                 "head_init": "text"}))
    return root / "final.pt"


def test_store_and_bundle_give_the_phase_a_heads_logits(head_checkpoint, tiny_data, tmp_path, single_thread):
    from stages.bundle.run import Bundle, export
    from stages.extract.run import extract
    from store.features import FeatureStore
    from store.shards import load_dataset, read_shard

    store_path = tmp_path / "s.zarr"
    extract(str(head_checkpoint), tiny_data, store_path, splits=["test"], batch_size=64, workers=0, dtype="float32")
    store = FeatureStore.open(store_path)
    (feats, _), keys = store.features("test"), store.keys("test")
    stored = cosine_logits(torch.from_numpy(np.asarray(feats)), torch.from_numpy(store.text_embeddings()), 1.0)
    bb = create_model("ballad-tiny-vit", pretrained=str(head_checkpoint))
    towers = Towers(bb.model, head=bb.head, head_input=PRE_PROJECTION).eval()
    samples = {s.key: s for url in load_dataset(tiny_data).urls("test") for s in read_shard(url)}
    images = [Image.open(io.BytesIO(samples[k].image)).convert("RGB") for k in keys]
    with torch.no_grad():
        phase_a = cosine_logits(towers.image(torch.stack([bb.eval_transform(im) for im in images])), towers.head, 1.0)
    assert torch.allclose(stored, phase_a, atol=1e-4)
    export(head_checkpoint, None, store_path, tmp_path / "b.bundle")
    bundle = Bundle.load(tmp_path / "b.bundle", device="cpu")
    assert bundle.meta["model"]["head_input"] == PRE_PROJECTION
    predicted = bundle.logits(images)
    assert torch.allclose(predicted / store.logit_scale, phase_a, atol=1e-4)
    bundle.set_classes(["a new class", *store.classnames[:2]])  # a new class is mapped as the text init maps
    assert bundle.text.shape == (3, 128) and torch.allclose(bundle.text.norm(dim=1), torch.ones(3), atol=1e-5)
