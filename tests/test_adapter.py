"""Phase B from cached features: training, schedule, epoch selection, losses, saving/loading, the CLI and
its errors (the samplers: test_samplers.py)."""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import stages.adapter.train as adapter_module
from lt_features import make_lt_store
from cli import main
from pipeline.errors import UserError
from stages.adapter import CosineCrossEntropy, TrainConfig, fit, load_adapter, train_adapter
from stages.evaluate.run import evaluate as run_evaluate
from stages.evaluate.sweep import sweep as run_sweep
from stages.evaluate.config import EvaluateConfig, SweepConfig

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(batch_size=64)  # the synthetic store has ~2.6k train features: 41 steps per epoch


def evaluate(features, out, **options):
    return run_evaluate(EvaluateConfig(features=str(features), out=str(out), **options))


def sweep(features, out, lambdas, cfg=None, **options):
    train = asdict(cfg) if cfg is not None else {}
    return run_sweep(SweepConfig(features=str(features), out=str(out), lambdas=",".join(map(str, lambdas)),
                                 **train, **options))


@pytest.fixture(scope="module")
def val_store(lt_store, tmp_path_factory):
    """``lt_store`` with a val split: every third test sample (20 per class) moves to val."""
    from store.features import FeatureStore
    from store.feature_writer import write_store

    store = FeatureStore.open(lt_store)
    (train, ytrain), (test, ytest) = store.features("train"), store.features("test")
    val = np.arange(len(ytest)) % 3 == 0
    path = tmp_path_factory.mktemp("val") / "val.zarr"
    write_store(path, image={"train": train, "val": test[val], "test": test[~val]},
                labels={"train": ytrain, "val": ytest[val], "test": ytest[~val]}, keys=None,
                text_embeddings=store.text_embeddings(), classnames=store.classnames, logit_scale=store.logit_scale,
                train_class_counts=store.train_class_counts)
    return path


def toy_problem(n=400):
    """Two classes split by the sign of the first feature; class texts at random."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, 8, generator=g)
    return feats, (feats[:, 0] > 0).long(), F.normalize(torch.randn(2, 8, generator=g), dim=-1)


# ---------------------------------------------------------------- training
@pytest.mark.slow  # three adapters, ten epochs each
def test_balanced_adapter_raises_few_shot_accuracy(lt_store, tmp_path):
    none = evaluate(lt_store, tmp_path / "none")
    few = {}
    for sampler in ("class-aware", "class-balanced", "instance"):
        train_adapter(lt_store, tmp_path / f"{sampler}.pt", TrainConfig(sampler=sampler, **FAST))
        few[sampler] = evaluate(lt_store, tmp_path / sampler, adapter=tmp_path / f"{sampler}.pt")["few"]
    for balanced in ("class-aware", "class-balanced"):
        assert few[balanced] > none["few"] + 10
        assert few[balanced] > few["instance"] + 2


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
    feats, labels, text = toy_problem()
    fitted = fit(feats, labels, text, 10.0, TrainConfig(epochs=5, batch_size=32, lam=1.0))
    pred = (fitted.model.embed(feats) @ fitted.model.classifier(text).T).argmax(1)
    assert (pred == labels).float().mean() > 0.9 and fitted.losses[-1] < fitted.losses[0]
    assert fitted.select == "last" and fitted.selected_epoch == 5 and fitted.val_acc_per_epoch == []


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize("schedule", ["authors", "standard"])
def test_epoch_learning_rates_follow_torch_cosine(monkeypatch, schedule):
    """authors: CosineAnnealingLR(T_max=epochs, eta_min=0).step() at the start of every epoch; standard: at the end."""
    seen = []
    sgd_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(float(self.param_groups[0]["lr"]))
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    feats, labels, text = toy_problem()
    epochs, steps = 6, 400 // 50
    fit(feats, labels, text, 10.0, TrainConfig(epochs=epochs, batch_size=50, lr=0.3, schedule=schedule))
    monkeypatch.undo()
    per_epoch = seen[::steps]
    assert seen == [lr for lr in per_epoch for _ in range(steps)]  # one rate per epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0)
    expected = []
    with warnings.catch_warnings():  # torch warns of scheduler steps without optimizer steps
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            if schedule == "authors":
                scheduler.step()
            expected.append(opt.param_groups[0]["lr"])
            if schedule == "standard":
                scheduler.step()
    assert per_epoch == pytest.approx(expected, abs=1e-12)
    assert (per_epoch[0] < 0.3 and per_epoch[-1] == pytest.approx(0)) == (schedule == "authors")

@pytest.mark.parametrize("command", ["adapter", "sweep"])
def test_a_run_in_which_no_epoch_trains_is_refused_and_two_epochs_run(lt_store, tmp_path, caplog, command):
    """Issue 22: `--epochs 1` on the authors' schedule ran its one epoch at lr 0, and fit only warned."""
    out = tmp_path / "out"
    args = [command, "--features", str(lt_store), "--batch-size", "64", "--device", "cpu", "--out", str(out)]
    args += ["--lambdas", "0.2"] if command == "sweep" else []
    result = CliRunner().invoke(main, [*args, "--epochs", "1"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.output == ("Error: --epochs 1: with --schedule authors every epoch would run at lr 0 and no weight "
                             "would change (the authors' schedule keeps the last epoch at lr 0); pass --epochs 2 or "
                             "more, or --schedule standard\n")
    assert not out.exists()
    with pytest.raises(UserError, match="^--epochs 1: with --schedule authors every epoch would run at lr 0"):
        fit(*toy_problem(), 10.0, TrainConfig(epochs=1))
    with caplog.at_level(logging.INFO, logger="ballad.schedule"):
        result = CliRunner().invoke(main, [*args, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert caplog.text.count("epoch 2 of 2 runs at lr 0, where the cosine has reached 0") == 1  # once, not per λ


# ---------------------------------------------------------------- epoch selection
def test_best_val_keeps_the_first_best_epoch(monkeypatch):
    scores = [50.0, 70.0, 70.0, 60.0]  # epoch 2 ties with epoch 3: the earlier one is kept
    states = []

    def scripted_top1(model, feats, labels, text):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return scores[len(states) - 1]

    monkeypatch.setattr(adapter_module, "top1", scripted_top1)
    feats, labels, text = toy_problem()
    cfg = TrainConfig(epochs=4, batch_size=50, schedule="standard")
    fitted = fit(feats, labels, text, 10.0, cfg, val=(feats, labels))
    assert (fitted.select, fitted.selected_epoch, fitted.val_acc) == ("best-val", 2, 70)
    assert fitted.val_acc_per_epoch == scores
    assert all(torch.equal(v, states[1][k]) for k, v in fitted.model.state_dict().items())
    assert not torch.equal(states[1]["visual.linear.weight"], states[3]["visual.linear.weight"])
    states.clear()
    last = fit(feats, labels, text, 10.0, TrainConfig(epochs=4, batch_size=50, schedule="standard", select="last"),
               val=(feats, labels))
    assert last.selected_epoch == 4 and all(torch.equal(v, states[3][k]) for k, v in last.model.state_dict().items())


def test_scoring_val_leaves_training_as_it_was():
    feats, labels, text = toy_problem()
    cfg = TrainConfig(epochs=4, batch_size=50, select="last")
    plain = fit(feats, labels, text, 10.0, cfg)
    scored = fit(feats, labels, text, 10.0, cfg, val=(feats[:100], labels[:100]))
    assert plain.losses == scored.losses and len(scored.val_acc_per_epoch) == 4
    assert all(torch.equal(v, scored.model.state_dict()[k]) for k, v in plain.model.state_dict().items())


def test_adapter_keeps_best_val_epoch_of_the_store(val_store, tmp_path):
    blob = train_adapter(val_store, tmp_path / "best.pt", TrainConfig(**FAST))
    vals = blob["val_acc_per_epoch"]
    assert blob["config"]["select"] == "auto" and blob["select"] == "best-val" and len(vals) == 10
    assert blob["selected_epoch"] == vals.index(max(vals)) + 1 and blob["val_acc"] == max(vals)
    assert blob["num_val"] == 480
    # the file holds that epoch's weights: evaluate scores them on val as training did
    assert evaluate(val_store, tmp_path / "v", adapter=tmp_path / "best.pt", split="val")["top1"] == pytest.approx(
        max(vals))
    last = train_adapter(val_store, tmp_path / "last.pt", TrainConfig(select="last", **FAST))
    assert last["losses"] == blob["losses"] and last["val_acc_per_epoch"] == vals
    assert last["select"] == "last" and last["selected_epoch"] == 10 and last["val_acc"] == vals[-1]
    # sweep keeps its epoch by the same rule, per λ
    row, = sweep(val_store, tmp_path / "sweep", [0.2], TrainConfig(**FAST))
    epoch = blob["selected_epoch"]
    assert (row["selected_epoch"], row["val_acc"], row["train_loss"]) == (epoch, max(vals), blob["losses"][epoch - 1])
    assert row["top1"] == pytest.approx(evaluate(val_store, tmp_path / "t", adapter=tmp_path / "best.pt")["top1"])


def test_selection_without_val_split(lt_store, tmp_path):
    blob = train_adapter(lt_store, tmp_path / "a.pt", TrainConfig(epochs=3, **FAST))
    assert (blob["select"], blob["selected_epoch"], blob["val_acc_per_epoch"], blob["val_acc"]) == ("last", 3, [], None)
    for run in (lambda cfg: train_adapter(lt_store, tmp_path / "b.pt", cfg),
                lambda cfg: sweep(lt_store, tmp_path / "sweep", [0.2], cfg)):
        with pytest.raises(UserError, match=r"--select best-val: .*lt\.zarr has no val split"):
            run(TrainConfig(select="best-val", **FAST))
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("dtype,scale,bias", [(torch.float64, 1.0, False), (torch.float32, 500.0, False),
                                              (torch.float64, 1.0, True), (torch.float32, 100.0, True)])
def test_fused_loss_matches_autograd(dtype, scale, bias):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g, dtype=dtype, requires_grad=True)
    w = (scale * torch.randn(5, 8, generator=g, dtype=dtype)).requires_grad_()  # 500: some probabilities underflow
    y = torch.randint(0, 5, (16,), generator=g)
    b = 2.0 * torch.log(torch.tensor([0.5, 0.3, 0.1, 0.07, 0.03], dtype=dtype)) if bias else None
    loss = CosineCrossEntropy.apply(z, w, y, b)
    dz, dw = torch.autograd.grad(3 * loss, (z, w))
    logits = F.normalize(z, dim=-1) @ w.T
    ref = F.cross_entropy(logits + b if bias else logits, y)  # the logit-adjusted loss: CE of shifted logits
    rz, rw = torch.autograd.grad(3 * ref, (z, w))
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(dz, rz, rtol=1e-4, atol=1e-6) and torch.allclose(dw, rw, rtol=1e-4, atol=1e-6)


def test_logit_adjusted_training_shifts_training_logits_only(lt_store, tmp_path, monkeypatch):
    from store.features import FeatureStore

    biases = []
    apply = CosineCrossEntropy.apply
    monkeypatch.setattr(CosineCrossEntropy, "apply", lambda z, w, y, b: (biases.append(b), apply(z, w, y, b))[1])
    train_adapter(lt_store, tmp_path / "ce.pt", TrainConfig(epochs=3, **FAST))
    assert all(b is None for b in biases)
    biases.clear()
    blob = train_adapter(lt_store, tmp_path / "la.pt", TrainConfig(epochs=3, loss="logit-adjusted", la_tau=1.5, **FAST))
    store = FeatureStore.open(lt_store)
    counts = store.train_class_counts
    prior = torch.from_numpy(np.log(counts / counts.sum())).float()
    assert biases and all(torch.allclose(b, 1.5 * prior) for b in biases)  # τ·log(train class prior)
    assert blob["config"]["loss"] == "logit-adjusted" and blob["config"]["la_tau"] == 1.5
    ce = torch.load(tmp_path / "ce.pt", weights_only=True)["state_dict"]
    assert not torch.equal(ce["visual.linear.weight"], blob["state_dict"]["visual.linear.weight"])
    # evaluation scores the adapter's plain logits: no prior shift
    evaluate(lt_store, tmp_path / "r", adapter=tmp_path / "la.pt")
    model = load_adapter(tmp_path / "la.pt", store, lt_store)
    feats, _ = store.features("test", device="cpu")
    with torch.no_grad():
        plain = (model.embed(feats.float()) @ model.classifier(store.text_embeddings(device="cpu")).T).softmax(1)
    saved = np.load(tmp_path / "r" / "predictions.npz")
    assert np.allclose(saved["score"][:, 0], plain.max(1).values.numpy(), atol=1e-5)
    assert (saved["top5"][:, 0] == plain.argmax(1).numpy()).mean() > 0.99


def test_logit_adjusted_with_tau_zero_is_cross_entropy():
    feats, labels, text = toy_problem()
    ce = fit(feats, labels, text, 10.0, TrainConfig(epochs=2, batch_size=50))
    la0 = fit(feats, labels, text, 10.0, TrainConfig(epochs=2, batch_size=50, loss="logit-adjusted", la_tau=0.0))
    la = fit(feats, labels, text, 10.0, TrainConfig(epochs=2, batch_size=50, loss="logit-adjusted"))
    assert ce.losses == la0.losses and la.losses != ce.losses


def test_non_finite_loss_stops_and_writes_nothing(lt_store, tmp_path):
    cfg = TrainConfig(lr=1e30, **FAST)  # finite, so it passes the checks; the weights overflow in epoch 1
    with pytest.raises(UserError, match=r"^epoch 1: loss is (nan|inf); stopped, nothing written; lower --lr$"):
        train_adapter(lt_store, tmp_path / "a.pt", cfg)
    with pytest.raises(UserError, match="loss is"):
        sweep(lt_store, tmp_path / "sweep", [0.2], cfg)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("option,value", [
    ("lam", 1.5), ("lam", -0.1), ("lam", math.nan), ("lam", math.inf), ("lr", math.inf), ("lr", math.nan),
    ("lr", -1.0), ("lr", 0.0), ("momentum", 1.0), ("momentum", -0.1), ("momentum", math.nan),
    ("weight_decay", -1e-4), ("weight_decay", math.inf), ("la_tau", -1.0), ("la_tau", math.nan), ("epochs", 0),
    ("epochs", 2.5), ("batch_size", 0), ("seed", -1), ("sampler", "nope"), ("form", "nope"), ("position", "nope"),
    ("schedule", "nope"), ("select", "nope"), ("loss", "nope")])
def test_every_option_is_checked_before_work(tmp_path, option, value):
    flag = TrainConfig.__dataclass_fields__[option].metadata["flag"]
    message = rf"^{re.escape(flag)} {re.escape(str(value))}: (must be|choose one of)"
    missing = tmp_path / "missing.zarr"  # the option's error comes first, not the store's
    cfg = TrainConfig(**{option: value})
    with pytest.raises(UserError, match=message):
        train_adapter(missing, tmp_path / "a.pt", cfg)
    with pytest.raises(UserError, match=message):
        sweep(missing, tmp_path / "s", [value] if option == "lam" else [0.2], cfg)


def test_adapter_from_another_store_is_refused(lt_store, tmp_path):
    train_adapter(lt_store, tmp_path / "a.pt", TrainConfig(epochs=1, schedule="standard", **FAST))
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
    with pytest.raises(UserError, match="no split 'dev'"):
        sweep(lt_store, tmp_path / "s", [0.2], split="dev")
    broken = tmp_path / "broken.zarr"
    shutil.copytree(lt_store, broken)
    zarr.open_group(str(broken), mode="r+")["train"].attrs["complete"] = False
    with pytest.raises(UserError, match="'train' is incomplete"):
        train_adapter(broken, tmp_path / "a.pt")


# ---------------------------------------------------------------- CLI
def test_cli_adapter_evaluate_and_errors(lt_store, tmp_path):
    runner = CliRunner()
    model = tmp_path / "models" / "adapter.pt"
    r = runner.invoke(main, ["adapter", "--features", str(lt_store), "--epochs", "2", "--batch-size", "64",
                             "--device", "cpu", "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert "kept epoch 2 of 2 by last" in r.output
    blob = torch.load(model, weights_only=True)
    # every option not given takes TrainConfig's default, and the file records them all
    assert blob["config"] == asdict(TrainConfig(epochs=2, batch_size=64))
    assert blob["fingerprint"]["model"] == "synthetic"
    r = runner.invoke(main, ["evaluate", "--features", str(lt_store), "--adapter", str(model),
                             "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "rep" / "metrics.json").read_text())) >= {"top1", "few", "ece"}
    model.unlink()
    adapter = ["adapter", "--features", str(lt_store), "--out", str(model)]
    for args, message in [(adapter + ["--lambda", "1.5"], "--lambda 1.5"), (adapter + ["--lr", "inf"], "--lr inf"),
                          (adapter + ["--lr", "nan"], "--lr nan"), (adapter + ["--momentum", "1"], "--momentum 1.0"),
                          (adapter + ["--weight-decay", "-1"], "--weight-decay -1.0"),
                          (adapter + ["--la-tau", "nan"], "--la-tau nan"),
                          (adapter + ["--select", "best-val"], "--select best-val"),
                          (["sweep", "--features", str(lt_store), "--lambdas", "0.1,nan", "--out", str(tmp_path / "s")],
                           "--lambdas 0.1,nan"),
                          (["sweep", "--features", str(lt_store), "--lr", "-1", "--out", str(tmp_path / "s")],
                           "--lr -1"),
                          (["adapter", "--features", str(tmp_path / "nope.zarr"), "--out", str(model)], "nope.zarr"),
                          (["evaluate", "--features", str(lt_store), "--adapter", str(tmp_path / "x.pt"),
                            "--out", str(tmp_path / "r")], "x.pt")]:
        r = runner.invoke(main, args)
        assert r.exit_code != 0 and "Error: " in r.output and message in r.output, (args, r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not model.exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("loss", ["focal", "ldam", "class-balanced", "grw", "lade"])
def test_every_registered_loss_trains_phase_b_and_is_recorded(loss):
    """A loss outside the fused kernel: fit runs it on the cosine logits, and it changes the run."""
    feats, labels, text = toy_problem()
    ce = fit(feats, labels, text, 10.0, TrainConfig(epochs=2, batch_size=50))
    other = fit(feats, labels, text, 10.0, TrainConfig(epochs=2, batch_size=50, loss=loss))
    assert all(math.isfinite(v) for v in other.losses) and other.losses != ce.losses
