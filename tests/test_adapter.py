"""Phase B from cached features: samplers, training, saving/loading, the CLI and its errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lt_features import make_lt_store
from pipeline.cli import main
from pipeline.errors import UserError
from stages.adapter import CosineCrossEntropy, TrainConfig, fit, load_adapter, train_adapter
from stages.evaluate import evaluate
from stages.samplers import EpochSampler

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(batch_size=64)  # the synthetic store has ~2.6k train features: 41 steps per epoch



# ---------------------------------------------------------------- samplers
LABELS = torch.repeat_interleave(torch.arange(6), torch.tensor([500, 120, 40, 9, 3, 0]))


@pytest.mark.parametrize("name", ["class-balanced", "sqrt", "progressive", "instance"])
def test_sampler_class_frequencies(name):
    counts = torch.bincount(LABELS, minlength=6).double()
    expected = {"class-balanced": (counts > 0).double(), "sqrt": counts.sqrt(), "instance": counts,
                "progressive": counts}[name]  # progressive starts instance-balanced
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


def test_class_aware_visits_every_class_in_cycles_of_four():
    sampler = EpochSampler("class-aware", LABELS, 6, 20, torch.Generator().manual_seed(0))
    drawn = sampler.epoch(0, 1).flatten()
    classes = LABELS[drawn]
    visits = classes.view(-1, 4)
    assert (visits == visits[:, :1]).all()  # 4 consecutive draws per visit
    present = 5
    for cycle in visits[:, 0].view(-1)[: len(visits) // present * present].view(-1, present):
        assert sorted(cycle.tolist()) == list(range(present))  # every non-empty class once per cycle
    few = drawn[classes == 4]
    few = few[: len(few) // 3 * 3].view(-1, 3)  # 3 samples, cycled in shuffled order: each once per 3 draws
    assert all(sorted(row.tolist()) == torch.nonzero(LABELS == 4).flatten().tolist() for row in few)


# ---------------------------------------------------------------- training
def test_balanced_adapter_raises_few_shot_accuracy(lt_store, tmp_path):
    none = evaluate(lt_store, tmp_path / "none")
    few = {}
    for sampler in ("class-balanced", "instance"):
        train_adapter(lt_store, tmp_path / f"{sampler}.pt", TrainConfig(sampler=sampler, **FAST))
        few[sampler] = evaluate(lt_store, tmp_path / sampler, adapter=tmp_path / f"{sampler}.pt")["few"]
    assert few["class-balanced"] > none["few"] + 10
    assert few["class-balanced"] > few["instance"] + 2


@pytest.mark.parametrize("form,position", [("relu", "visual"), ("linear", "text"), ("relu", "both")])
def test_variants_train_and_reload(lt_store, tmp_path, form, position):
    blob = train_adapter(lt_store, tmp_path / "a.pt", TrainConfig(form=form, position=position, epochs=3, **FAST))
    assert blob["losses"][-1] < blob["losses"][0]
    from store.features import FeatureStore

    model = load_adapter(tmp_path / "a.pt", FeatureStore.open(lt_store), lt_store)
    assert (model.visual is not None) == (position != "text") and (model.text is not None) == (position != "visual")
    assert all((m.linear.bias is not None) == (form == "relu") for m in (model.visual, model.text) if m is not None)
    metrics = evaluate(lt_store, tmp_path / "r", adapter=tmp_path / "a.pt")
    assert 0 <= metrics["top1"] <= 100


def test_same_seed_same_adapter_and_metrics(lt_store, tmp_path):
    cfg = TrainConfig(epochs=2, **FAST)
    runs = []
    for name in ("a", "b"):
        blob = train_adapter(lt_store, tmp_path / f"{name}.pt", cfg)
        runs.append((blob["state_dict"], evaluate(lt_store, tmp_path / name, adapter=tmp_path / f"{name}.pt")))
    (wa, ma), (wb, mb) = runs
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and ma == mb
    other = train_adapter(lt_store, tmp_path / "c.pt", TrainConfig(epochs=2, seed=1, **FAST))["state_dict"]
    assert not all(torch.equal(wa[k], other[k]) for k in wa)


def test_fit_learns_on_tensors():
    torch.manual_seed(0)
    feats = torch.randn(400, 8)
    labels = (feats[:, 0] > 0).long()
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    model, losses = fit(feats, labels, text, 10.0, TrainConfig(epochs=5, batch_size=32, lam=1.0))
    pred = (model.embed(feats) @ model.classifier(text).T).argmax(1)
    assert (pred == labels).float().mean() > 0.9 and losses[-1] < losses[0]


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("cfg,match", [(dict(lam=1.5), "--lambda"), (dict(lam=-0.1), "--lambda"),
                                       (dict(epochs=0), "--epochs"), (dict(sampler="nope"), "--sampler")])
def test_bad_config(lt_store, tmp_path, cfg, match):
    with pytest.raises(UserError, match=match):
        train_adapter(lt_store, tmp_path / "a.pt", TrainConfig(**cfg))


def test_adapter_from_another_store_is_refused(lt_store, tmp_path):
    train_adapter(lt_store, tmp_path / "a.pt", TrainConfig(epochs=1, **FAST))
    make_lt_store(tmp_path / "other.zarr", model="another-model")
    with pytest.raises(UserError, match="another feature store.*model"):
        evaluate(tmp_path / "other.zarr", tmp_path / "r", adapter=tmp_path / "a.pt")
    make_lt_store(tmp_path / "narrow.zarr", dim=8)
    with pytest.raises(UserError, match="16-d features.*8-d"):
        evaluate(tmp_path / "narrow.zarr", tmp_path / "r", adapter=tmp_path / "a.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        evaluate(lt_store, tmp_path / "r", adapter=tmp_path / "junk.pt")


def test_missing_and_incomplete_splits(lt_store, tmp_path):
    import shutil

    import zarr

    with pytest.raises(UserError, match="no split 'val'"):
        evaluate(lt_store, tmp_path / "r", split="val")
    broken = tmp_path / "broken.zarr"
    shutil.copytree(lt_store, broken)
    zarr.open_group(str(broken), mode="r+")["train"].attrs["complete"] = False
    with pytest.raises(UserError, match="'train' is incomplete"):
        train_adapter(broken, tmp_path / "a.pt")


# ---------------------------------------------------------------- CLI
def test_cli_adapter_evaluate_and_errors(lt_store, tmp_path):
    runner = CliRunner()
    model = tmp_path / "models" / "adapter.pt"
    r = runner.invoke(main, ["adapter", "--features", str(lt_store), "--lambda", "0.2", "--epochs", "2",
                             "--batch-size", "64", "--device", "cpu", "--out", str(model)])
    assert r.exit_code == 0, r.output
    blob = torch.load(model, weights_only=True)
    assert blob["config"]["lam"] == 0.2 and blob["fingerprint"]["model"] == "synthetic"
    r = runner.invoke(main, ["evaluate", "--features", str(lt_store), "--adapter", str(model),
                             "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "rep" / "metrics.json").read_text())) >= {"top1", "few", "ece"}
    for args, message in [(["adapter", "--features", str(lt_store), "--lambda", "1.5", "--out", str(model)],
                           "--lambda 1.5"),
                          (["adapter", "--features", str(tmp_path / "nope.zarr"), "--out", str(model)], "nope.zarr"),
                          (["evaluate", "--features", str(lt_store), "--adapter", str(tmp_path / "x.pt"),
                            "--out", str(tmp_path / "r")], "x.pt")]:
        r = runner.invoke(main, args)
        assert r.exit_code != 0 and "Error: " in r.output and message in r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1.0), (torch.float32, 500.0)])
def test_fused_loss_matches_autograd(dtype, scale):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g, dtype=dtype, requires_grad=True)
    w = (scale * torch.randn(5, 8, generator=g, dtype=dtype)).requires_grad_()  # 500: some probabilities underflow
    y = torch.randint(0, 5, (16,), generator=g)
    loss = CosineCrossEntropy.apply(z, w, y)
    dz, dw = torch.autograd.grad(3 * loss, (z, w))
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.normalize(z, dim=-1) @ w.T, y)
    rz, rw = torch.autograd.grad(3 * ref, (z, w))
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(dz, rz, rtol=1e-4, atol=1e-6) and torch.allclose(dw, rw, rtol=1e-4, atol=1e-6)
