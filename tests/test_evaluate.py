"""Evaluation: shot metrics, calibration, report files, logit adjustment and the λ sweep."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline.errors import UserError
from stages.evaluate.files import write_per_class_csv, write_report
from stages.evaluate.plots import accuracy_bins, plot_per_class
from stages.evaluate.run import evaluate as run_evaluate
from stages.evaluate.score import calibration_error, score, shot_accuracy
from stages.evaluate.sweep import sweep as run_sweep
from stages.evaluate.config import EvaluateConfig, SweepConfig


def evaluate(features, out, **options):
    return run_evaluate(EvaluateConfig(features=str(features), out=str(out), **options))


def sweep(features, out, lambdas, cfg=None, **options):
    from dataclasses import asdict

    train = asdict(cfg) if cfg is not None else {}
    return run_sweep(SweepConfig(features=str(features), out=str(out), lambdas=",".join(map(str, lambdas)),
                                 **train, **options))

pytestmark = pytest.mark.usefixtures("single_thread")



def oltr_shot_acc(pred, labels, train_counts, many, few):
    """The official shot_acc loop, over the classes present in the test labels."""
    groups = {"many": [], "medium": [], "few": []}
    for c in np.unique(labels):
        acc = 100 * np.mean(pred[labels == c] == c)
        n = train_counts[c]
        groups["many" if n > many else "few" if n < few else "medium"].append(acc)
    return {k: (np.mean(v) if v else None) for k, v in groups.items()}


@pytest.mark.parametrize("train_counts", [
    [500, 101, 100, 40, 20, 19, 5, 1],     # every group, thresholds on both sides of the boundaries
    [500, 300, 150, 90, 60, 30, 25, 20],   # no few-shot class
])
def test_shot_accuracy_matches_per_class_recomputation(train_counts):
    rng = np.random.default_rng(0)
    counts = np.array(train_counts)
    labels = rng.integers(0, 7, 400)  # class 7 has no test samples: ignored, like the official code
    pred = np.where(rng.random(400) < 0.6, labels, rng.integers(0, 8, 400))
    groups, acc, test_counts = shot_accuracy(pred, labels, counts, many=100, few=20)
    expected = oltr_shot_acc(pred, labels, counts, 100, 20)
    for name in ("many", "medium", "few"):
        assert (groups[name] is None) == (expected[name] is None)
        if expected[name] is not None:
            assert groups[name] == pytest.approx(expected[name])
    assert np.isnan(acc[7]) and test_counts[7] == 0 and test_counts.sum() == 400


def test_calibration_error_matches_binned_definition():
    rng = np.random.default_rng(1)
    conf = np.concatenate([rng.random(1000), [1.0, 1 / 15, 2 / 15]])  # include bin edges
    correct = rng.random(len(conf)) < conf ** 0.5
    expected = 0.0
    for b in range(15):
        m = (conf > b / 15) & (conf <= (b + 1) / 15)
        if m.any():
            expected += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    assert calibration_error(conf, correct) == pytest.approx(100 * expected)
    assert calibration_error(np.ones(10), np.ones(10, dtype=bool)) == 0


def test_evaluate_writes_consistent_report(lt_store, tmp_path):
    m = evaluate(lt_store, tmp_path / "zs")
    assert set(m) == {"top1", "top5", "many", "medium", "few", "ece", "num_test", "num_classes", "tta", "tta_views"}
    assert m["tta"] == "none" and m["tta_views"] is None
    assert json.loads((tmp_path / "zs" / "metrics.json").read_text()) == m
    pred = np.load(tmp_path / "zs" / "predictions.npz")
    assert pred["top5"].shape == (m["num_test"], 5) and (np.diff(pred["score"], axis=1) <= 0).all()
    assert m["top1"] == pytest.approx(100 * np.mean(pred["top5"][:, 0] == pred["label"]))
    assert m["top5"] == pytest.approx(100 * np.mean((pred["top5"] == pred["label"][:, None]).any(1)))
    rows = list(csv.DictReader(open(tmp_path / "zs" / "per_class.csv")))
    assert len(rows) == m["num_classes"]
    few = [float(r["accuracy"]) for r in rows if int(r["train_count"]) < 20]
    assert m["few"] == pytest.approx(np.mean(few), abs=0.01)
    assert (tmp_path / "zs" / "per_class.png").read_bytes()[:4] == b"\x89PNG"
    assert list(rows[0]) == ["class_index", "train_count", "test_count", "accuracy", "group", "class"]


def scored(train_counts, per_class: int, seed: int = 0) -> dict:
    """``score`` of random logits where about 60 % of the samples get their own class's logit raised."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(train_counts)), per_class)
    logits = torch.from_numpy(rng.standard_normal((len(labels), len(train_counts)), dtype=np.float32))
    hit = np.flatnonzero(rng.random(len(labels)) < 0.6)
    logits[hit, labels[hit]] += 10
    return score(logits, labels, np.asarray(train_counts))


def in_bin(bins, counts):
    """[classes, bins] membership by the documented rule lo <= max(count, 1) < hi."""
    c = np.maximum(counts, 1)[:, None]
    return (bins["lo"] <= c) & (c < bins["hi"])


def test_accuracy_bins_cover_each_tested_class_once_and_weight_by_test_images():
    rng = np.random.default_rng(0)
    counts = np.round(np.geomspace(1000, 2, 500)).astype(int)
    counts[:3] = 0  # no train image: counted as 1, in the first bin
    test = rng.integers(0, 5, len(counts))  # about a fifth of the classes untested
    correct = rng.binomial(test, 0.5)
    b = accuracy_bins(counts, test, correct)
    assert 12 <= len(b["lo"]) <= 16
    member = in_bin(b, counts)
    assert (member[test > 0].sum(1) == 1).all() and (b["classes"] == member[test > 0].sum(0)).all()
    on_edge = np.isin(counts, b["lo"][1:])
    assert on_edge.any()  # classes exactly on an edge: in the bin the edge opens
    assert (member[on_edge].argmax(1) == np.searchsorted(b["lo"], counts[on_edge])).all()
    for i in range(len(b["lo"])):
        m = member[:, i] & (test > 0)
        assert b["images"][i] == test[m].sum()
        assert b["accuracy"][i] == pytest.approx(100 * correct[m].sum() / test[m].sum())
        assert b["low"][i] <= b["accuracy"][i] <= b["high"][i]
    group = lambda n: "many" if n > 100 else "few" if n < 20 else "medium"  # noqa: E731
    assert all(group(lo) == group(hi - 1) for lo, hi in zip(b["lo"], b["hi"]))  # no bin mixes two groups
    assert {20, 101} <= set(b["lo"])


def test_accuracy_bins_leave_out_empty_bins_and_small_k_gets_fewer():
    counts = np.array([1000] * 20 + [2] * 20 + [50])
    test = np.array([3] * 40 + [0])  # the class at 50 has no test sample: its bin has no accuracy
    b = accuracy_bins(counts, test, np.full(41, 1))
    assert len(b["lo"]) == 2 and (b["classes"] == 20).all() and b["hi"][0] < b["lo"][1]
    two = accuracy_bins(np.array([5, 5]), np.array([10, 10]), np.array([4, 6]))
    # ratio-estimator interval over the classes: p = 0.5, Σ (c − p·n)² = 2, se = √(2 · 2/1) / 20 = 0.1
    assert len(two["lo"]) == 1 and two["accuracy"][0] == 50
    assert two["low"][0] == pytest.approx(50 - 19.6) and two["high"][0] == pytest.approx(50 + 19.6)
    one = accuracy_bins(np.array([5]), np.array([10]), np.array([4]))
    assert np.isnan(one["low"][0]) and one["accuracy"][0] == 40


def test_per_class_csv_parses_with_awkward_names(tmp_path):
    names = ['Aa, bb', 'say "hi"', "multi\nline", "plain", "trailing,", '"', "ünïcode", "x" * 300]
    counts = np.array([500, 120, 60, 20, 19, 5, 2, 0])
    result = scored(counts, per_class=4)
    result["test_counts"][-1], result["per_class"][-1] = 0, np.nan  # a class the split lacks
    write_per_class_csv(tmp_path / "p.csv", result, names, counts, 100, 20)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class_index", "train_count", "test_count", "accuracy", "group", "class"]
    assert [r[5] for r in rows[1:]] == names and all(len(r) == 6 for r in rows)
    assert [int(r[0]) for r in rows[1:]] == list(range(len(names)))
    assert [int(r[1]) for r in rows[1:]] == counts.tolist()
    assert [r[4] for r in rows[1:]] == ["many", "many", "medium", "medium", "few", "few", "few", "few"]
    assert [float(r[3]) for r in rows[1:-1]] == pytest.approx(result["per_class"][:-1], abs=0.005)
    assert rows[-1][2:4] == ["0", ""]


def test_predictions_npz_is_deflated_and_loads(tmp_path):
    import zipfile

    counts = np.round(np.geomspace(300, 3, 30)).astype(int)
    result = scored(counts, per_class=20)
    labels = np.repeat(np.arange(30), 20)
    keys = np.array([f"test/{i:06d}" for i in range(len(labels))])
    write_report(tmp_path, result, [f"c{i}" for i in range(30)], counts, keys, labels, 100, 20)
    with zipfile.ZipFile(tmp_path / "predictions.npz") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    pred = np.load(tmp_path / "predictions.npz")
    assert (pred["key"] == keys).all() and (pred["label"] == labels).all()
    assert (pred["top5"] == result["top5"]).all() and (pred["score"] == result["scores"]).all()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes left no temporary behind


@pytest.mark.parametrize("k", [30, 3000])
def test_per_class_plot_is_a_png_at_small_and_large_k(tmp_path, k):
    counts = np.round(np.geomspace(1000, 2, k)).astype(int)
    result = scored(counts, per_class=1)
    plot_per_class(tmp_path / "p.png", result, counts, 100, 20)
    data = (tmp_path / "p.png").read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 10_000


def test_logit_adjustment_subtracts_the_log_prior(lt_store, tmp_path):
    from store.features import FeatureStore

    store = FeatureStore.open(lt_store)
    feats, _ = store.features("test")
    f = torch.nn.functional.normalize(torch.from_numpy(feats).float(), dim=-1)
    prior = store.train_class_counts / store.train_class_counts.sum()
    log_prior = torch.from_numpy(np.log(prior)).float()
    logits = store.logit_scale * f @ torch.from_numpy(store.text_embeddings()).T - 2.0 * log_prior
    base = evaluate(lt_store, tmp_path / "plain")
    adjusted = evaluate(lt_store, tmp_path / "la", logit_adjust=2.0)
    top = np.load(tmp_path / "la" / "predictions.npz")["top5"][:, 0]
    assert (top == logits.argmax(1).numpy()).mean() > 0.99  # float16 features: ties may round apart
    assert adjusted["few"] > base["few"]


def test_sweep_table_and_lambda_zero_is_the_store(lt_store, tmp_path):
    from stages.adapter import TrainConfig

    rows = sweep(lt_store, tmp_path / "sweep", [0.0, 0.5], TrainConfig(epochs=2, batch_size=64))
    assert [r["lambda"] for r in rows] == [0.0, 0.5]
    assert list(rows[0]) == ["lambda", "top1", "top5", "many", "medium", "few", "ece", "selected_epoch", "val_acc",
                             "train_loss"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == rows
    assert len(list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))) == 2
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    none = evaluate(lt_store, tmp_path / "none")
    assert rows[0]["top1"] == pytest.approx(none["top1"]) and rows[0]["few"] == pytest.approx(none["few"])
    with pytest.raises(UserError, match=r"^--lambdas 0.1,2.0: --lambda 2.0: must be in \[0, 1\]$"):
        sweep(lt_store, tmp_path / "bad", [0.1, 2.0])


def test_cli_evaluate_and_sweep(lt_store, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", "--features", str(lt_store), "--out", str(tmp_path / "r"),
                             "--many-threshold", "50", "--few-threshold", "30", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "top-1" in r.output and json.loads((tmp_path / "r" / "metrics.json").read_text())["few"] is not None
    r = runner.invoke(main, ["sweep", "--features", str(lt_store), "--lambdas", "0.2,0.4", "--epochs", "1", "--schedule", "standard",
                             "--batch-size", "128", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())) == 2
    for args, message in [(["sweep", "--features", str(lt_store), "--lambdas", "0.1,x", "--out", "o"], "--lambdas"),
                          (["evaluate", "--features", str(lt_store), "--few-threshold", "200", "--out", "o"],
                           "--few-threshold 200"),
                          (["evaluate", "--features", str(lt_store), "--split", "val", "--out", "o"], "'val'")]:
        r = runner.invoke(main, args)
        assert r.exit_code != 0 and "Error: " in r.output and message in r.output and "Traceback" not in r.output


@pytest.fixture(scope="module")
def tta_store(tmp_path_factory, lt_store):
    """lt_store's test split with five noisy test-time views of every image."""
    from store.features import FeatureStore
    from store.feature_writer import write_store

    fs = FeatureStore.open(lt_store)
    rng = np.random.default_rng(3)
    image = {s: fs.features(s)[0] for s in ("train", "test")}
    labels = {s: fs.features(s)[1] for s in ("train", "test")}
    views = image["test"][None] + rng.normal(0, 0.8, (5, *image["test"].shape))
    path = tmp_path_factory.mktemp("tta") / "tta.zarr"
    write_store(path, image=image, labels=labels, keys=None, text_embeddings=fs.text_embeddings(),
                classnames=fs.classnames, logit_scale=fs.logit_scale, train_class_counts=fs.train_class_counts,
                tta={"test": ("five-crop", views)})
    return path


def test_tta_mean_averages_the_logits_of_the_stored_views(tta_store, tmp_path):
    from stages.adapter import TrainConfig, load_adapter, train_adapter
    from store.features import FeatureStore

    train_adapter(tta_store, tmp_path / "a.pt", TrainConfig(epochs=1, batch_size=64, schedule="standard"), device="cpu")
    store = FeatureStore.open(tta_store)
    m = evaluate(tta_store, tmp_path / "tta", adapter=str(tmp_path / "a.pt"), tta="mean")
    assert m["tta"] == "mean" and m["tta_views"] == "five-crop"
    assert json.loads((tmp_path / "tta" / "metrics.json").read_text())["tta"] == "mean"
    model = load_adapter(tmp_path / "a.pt", store, tta_store)
    with torch.no_grad():  # per view: the adapter, then the classifier; then the mean over the views
        classes = model.classifier(torch.from_numpy(store.text_embeddings()))
        views = torch.from_numpy(store.tta_features("test")).float()
        want = torch.stack([model.embed(v) @ classes.T for v in views]).mean(0).softmax(1).topk(5, dim=1)
    pred = np.load(tmp_path / "tta" / "predictions.npz")
    assert (pred["top5"][:, 0] == want.indices[:, 0].numpy()).mean() > 0.99  # float16 ties may round apart
    np.testing.assert_allclose(pred["score"], want.values.numpy(), atol=1e-4)
    plain = evaluate(tta_store, tmp_path / "plain", adapter=str(tmp_path / "a.pt"))
    assert plain["top1"] != m["top1"]  # the noisy views change the predictions: the views were used


@pytest.mark.parametrize("store, tta, message", [
    ("lt_store", "mean", r"--tta mean: split 'test' of .* has no test-time views; re-extract with "
                         r"`ballad-pipe extract … --test-views five-crop`"),
    ("tta_store", "median", "--tta median: choose one of none, mean"),
], ids=["no-views", "unknown-mode"])
def test_tta_needs_test_views_in_the_store(request, tmp_path, store, tta, message):
    with pytest.raises(UserError, match=message):
        evaluate(request.getfixturevalue(store), tmp_path / "r", tta=tta)


def test_cli_evaluate_tta_mean_says_which_views_it_averaged(tta_store, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--features", str(tta_store), "--tta", "mean", "--out",
                                  str(tmp_path / "cli"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "logits averaged over the five-crop views" in r.output


def test_cli_evaluate_tta_without_views_is_a_one_line_error(lt_store, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--features", str(lt_store), "--tta", "mean", "--out",
                                  str(tmp_path / "x")])
    assert r.exit_code != 0 and r.output.startswith("Error: --tta mean") and len(r.output.strip().splitlines()) == 1


def test_cli_evaluate_refuses_a_store_whose_logit_scale_was_edited_to_nan(lt_store, tmp_path):
    """Issue 22: zarr.json edited by hand to `"logit_scale": NaN` gave top-1 3.33, ECE nan and exit 0."""
    import shutil

    store = tmp_path / "edited.zarr"
    shutil.copytree(lt_store, store)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["logit_scale"] = float("nan")
    (store / "zarr.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["evaluate", "--features", str(store), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    assert r.output.startswith(f"Error: {store}: attribute 'logit_scale' is nan; expected a finite number > 0")


def test_dvc_reruns_only_evaluate_stages_for_evaluate_tta():
    from test_dvc_yaml import stages

    # DVC re-runs a stage when a param it lists changes; the evaluate stages pass their section whole
    readers = {name for name, stage in stages().items()
               if any(p == "evaluate" or p.startswith("evaluate.") for p in stage.get("params", []))}
    assert readers == {"evaluate@zero_shot", "evaluate@phase_a", "evaluate@ballad"}
    assert all("${evaluate}" in stages()[name]["cmd"] for name in readers)

