"""`ballad-pipe export` / `predict`: round trip against `evaluate`, mismatched parts, bad files, --classes."""
from __future__ import annotations

import io
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.encode import text_embeddings
from pipeline.errors import UserError
from stages.adapter import TrainConfig, train_adapter
from stages.bundle.run import Bundle, export
from stages.evaluate.run import evaluate as run_evaluate
from stages.evaluate.config import EvaluateConfig
from stages.extract.run import extract
from store.features import FeatureStore
from store.feature_writer import write_store
from store.shards import load_dataset, read_shard
from test_images import HOSTILE


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """The demo pipeline on tiny_data, cut short: checkpoint → extract → 1-epoch adapter → evaluate → export.

    The checkpoint is a seeded random init, so the margins the test-time ensembling test relies on are
    the same in every run."""
    from pipeline.models import create_model

    root = tmp_path_factory.mktemp("bundle")
    ckpt = root / "final.pt"
    torch.manual_seed(0)
    torch.save(create_model("ballad-tiny").model.state_dict(), ckpt)
    ckpt.with_suffix(".json").write_text(json.dumps({"model": "ballad-tiny", "pretrained": None}))
    features = root / "features.zarr"
    extract(str(ckpt), tiny_data, features, splits=["train", "test"], batch_size=64, workers=0, test_views="five-crop")
    adapter = root / "adapter.pt"
    train_adapter(features, adapter, TrainConfig(epochs=1, batch_size=64, schedule="standard"), device="cpu")
    run_evaluate(EvaluateConfig(str(features), str(root / "report"), adapter=str(adapter), device="cpu"))
    run_evaluate(EvaluateConfig(str(features), str(root / "report_tta"), adapter=str(adapter), tta="mean", device="cpu"))
    bundle = root / "shapes.bundle"
    export(ckpt, str(adapter), features, bundle)
    samples = [s for url in load_dataset(tiny_data).urls("test") for s in read_shard(url)]
    return SimpleNamespace(root=root, ckpt=ckpt, features=features, adapter=adapter, bundle=bundle, samples=samples,
                           report=np.load(root / "report" / "predictions.npz"),
                           report_tta=np.load(root / "report_tta" / "predictions.npz"))


def _image(sample):
    return Image.open(io.BytesIO(sample.image)).convert("RGB")


def test_bundle_predicts_what_evaluate_reports(run):
    assert sorted(p.name for p in run.bundle.iterdir()) == ["bundle.json", "head.safetensors", "model.safetensors"]
    meta = json.loads((run.bundle / "bundle.json").read_text())
    store = FeatureStore.open(run.features)
    assert meta["classnames"] == store.classnames and meta["logit_scale"] == store.logit_scale
    assert meta["adapter"]["config"]["lam"] == 0.2 and meta["adapter"]["config"]["form"] == "linear"
    assert meta["transform"] == {"resize_shorter_side": 32, "interpolation": "bicubic", "center_crop": [32, 32],
                                 "mean": pytest.approx([0.4815, 0.4578, 0.4082], abs=1e-4),
                                 "std": pytest.approx([0.2686, 0.2613, 0.2758], abs=1e-4)}

    bundle = Bundle.load(run.bundle, device="cpu")
    preds = bundle.predict([_image(s) for s in run.samples], top_k=5, batch_size=50)
    assert list(run.report["key"]) == [s.key for s in run.samples]
    # Same features (fp16 rounding included), adapter and classifier: the same top-5 up to float noise.
    names = np.array(bundle.classnames)
    assert [[c for c, _ in p] for p in preds] == names[run.report["top5"]].tolist()
    np.testing.assert_allclose([[q for _, q in p] for p in preds], run.report["score"], atol=1e-5)


def test_predict_tta_predicts_what_evaluate_tta_reports(run, tmp_path):
    bundle = Bundle.load(run.bundle, device="cpu")
    images = [_image(s) for s in run.samples]
    preds = bundle.predict(images, top_k=5, batch_size=50, tta="five-crop")
    names = np.array(bundle.classnames)
    # The same five views (one implementation), adapter, classifier and mean of logits as `evaluate --tta mean`.
    assert [[c for c, _ in p] for p in preds] == names[run.report_tta["top5"]].tolist()
    np.testing.assert_allclose([[q for _, q in p] for p in preds], run.report_tta["score"], atol=1e-6, rtol=0)
    assert np.abs(run.report_tta["score"] - run.report["score"]).max() > 1e-5  # the views changed the scores

    (tmp_path / "img.png").write_bytes(run.samples[0].image)
    r = CliRunner().invoke(main, ["predict", "--bundle", str(run.bundle), str(tmp_path / "img.png"), "--json",
                                  "--tta", "five-crop"])
    assert r.exit_code == 0, r.output
    got = [(p["class"], p["prob"]) for p in json.loads(r.stdout)["predictions"]]
    assert [c for c, _ in got] == [c for c, _ in preds[0]]
    np.testing.assert_allclose([q for _, q in got], [q for _, q in preds[0]], atol=1e-5)
    r = CliRunner().invoke(main, ["predict", "--bundle", str(run.bundle), str(tmp_path / "img.png"), "--tta", "mean"])
    assert r.exit_code != 0 and r.output.strip().splitlines() == [
        "Error: --tta mean: choose one of none, flip, five-crop, ten-crop"]


def test_predict_cli_reports_bad_files(run, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, s in enumerate(run.samples[:3]):
        (images / ("sub" if i else "") / f"{s.key}.png").write_bytes(s.image)
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    (images / "notes.txt").write_text("not an image, and not picked up by the directory walk")
    runner = CliRunner()
    r = runner.invoke(main, ["predict", "--bundle", str(run.bundle), str(images), str(tmp_path / "gone.jpg"),
                             "--json", "--top-k", "3", "--device", "cpu"])
    assert r.exit_code != 0
    assert "broken.png: skipped" in r.stderr and "gone.jpg: skipped" in r.stderr and "notes.txt" not in r.stderr
    assert "Error: 2 of 5 file(s) could not be read" in r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    want = Bundle.load(run.bundle, device="cpu").predict([_image(s) for s in run.samples[:3]], top_k=3)
    got = {line["image"].rsplit("/", 1)[1]: line["predictions"] for line in lines}
    assert got.keys() == {f"{s.key}.png" for s in run.samples[:3]}
    for s, w in zip(run.samples[:3], want):
        assert [(p["class"], pytest.approx(p["prob"], abs=1e-5)) for p in got[f"{s.key}.png"]] == w

    r = runner.invoke(main, ["predict", "--bundle", str(run.bundle), str(images / "sub"), "--top-k", "2"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1].split()[0] == "1" and len(r.stdout.splitlines()) == 2 * 3


def test_predict_reports_each_hostile_file_in_one_line_and_skip_bad_exits_0(run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(run.samples[0].image)  # 32 × 32
    for kind, (suffix, data, _) in HOSTILE.items():
        (images / f"{kind}.{suffix}").write_bytes(data)
    reports = {f"{kind}.{suffix}": f"{images / f'{kind}.{suffix}'}: skipped, not a readable image ({reason})"
               for kind, (suffix, _, reason) in HOSTILE.items()}
    predict = ["predict", "--bundle", str(run.bundle), str(images), "--device", "cpu", "--json"]
    r = CliRunner().invoke(main, predict)
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit)
    assert r.stderr.splitlines() == [*(reports[name] for name in sorted(reports)), "Error: 4 of 5 file(s) could not be "
                                     "read (listed above); pass --skip-bad to skip unreadable images"]
    assert [json.loads(line)["image"] for line in r.stdout.splitlines()] == [str(images / "good.png")]
    r = CliRunner().invoke(main, [*predict, "--skip-bad"])
    assert r.exit_code == 0 and r.stderr.splitlines() == [reports[name] for name in sorted(reports)]
    r = CliRunner().invoke(main, [*predict, "--max-pixels", "1023", str(images / "good.png")])
    assert r.exit_code != 0 and (f"{images / 'good.png'}: skipped, not a readable image (decompression bomb: 32×32 = "
                                 "1,024 pixels, above --max-pixels 1,023)") in r.stderr.splitlines()
    r = CliRunner().invoke(main, [*predict, "--max-pixels", "0"])
    assert r.exit_code != 0 and r.output == "Error: --max-pixels 0: must be at least 1\n"


def test_a_checkpoint_the_store_was_not_extracted_from_is_refused(run, tmp_path):
    other = torch.load(run.ckpt, weights_only=True)
    other["logit_scale"] += 1
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt: not the checkpoint .* was extracted from"):
        export(tmp_path / "other.pt", str(run.adapter), run.features, tmp_path / "b")

    r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / "other.pt"), "--adapter", str(run.adapter),
                                  "--features", str(run.features), "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1


def test_an_adapter_trained_on_another_store_is_refused(run, tmp_path):
    store = FeatureStore.open(run.features)
    names = [f"thing {i}" for i in range(store.num_classes)]
    feats = np.random.default_rng(0).normal(size=(60, store.embed_dim)).astype(np.float32)
    write_store(tmp_path / "elsewhere.zarr", image={"train": feats}, labels={"train": np.arange(60) % len(names)},
                keys=None, text_embeddings=store.text_embeddings(), classnames=names,
                logit_scale=store.logit_scale, train_class_counts=[2] * len(names),
                meta={"model": "ballad-tiny", "checkpoint_sha256": store.fingerprint["checkpoint_sha256"]})
    train_adapter(tmp_path / "elsewhere.zarr", tmp_path / "elsewhere.pt", TrainConfig(epochs=1, schedule="standard"), device="cpu")
    with pytest.raises(UserError, match=r"elsewhere.pt: trained on another feature store .*classnames_sha256"):
        export(run.ckpt, str(tmp_path / "elsewhere.pt"), run.features, tmp_path / "b")


def test_a_folder_that_is_not_a_bundle_is_neither_overwritten_nor_loaded(run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="taken: exists and is not a bundle"):
        export(run.ckpt, str(run.adapter), run.features, tmp_path / "taken")
    assert [f.name for f in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="not a bundle"):
        Bundle.load(tmp_path / "taken")


def test_a_head_from_another_bundle_is_refused(run, tmp_path):
    zero_shot = tmp_path / "zero.bundle"
    export(run.ckpt, "none", run.features, zero_shot)
    assert json.loads((zero_shot / "bundle.json").read_text())["adapter"] is None
    mixed = tmp_path / "mixed.bundle"
    shutil.copytree(run.bundle, mixed)
    shutil.copy(zero_shot / "head.safetensors", mixed / "head.safetensors")
    with pytest.raises(UserError, match="head.safetensors: does not belong to this bundle"):
        Bundle.load(mixed)


def _edited(run, tmp_path, edit) -> object:
    """A copy of the bundle whose bundle.json ``edit`` changed in place, as a user or a script could."""
    bundle = tmp_path / "edited.bundle"
    shutil.copytree(run.bundle, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    edit(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    return bundle


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(logit_scale=float("nan")), "key 'logit_scale' is nan; expected a finite number > 0"),
    (lambda m: m.update(feature_dtype="float64"), "key 'feature_dtype' is 'float64'; expected one of float16, float32"),
    (lambda m: m["classnames"].append(m["classnames"][0]), "key 'classnames' is ['"),
    (lambda m: m.update(templates=["a photo of a {0.__class__}."]), "key 'templates[0]' is 'a photo of a {0.__class"),
    (lambda m: m["adapter"]["config"].update(lam=2), "key 'adapter.config.lam' is 2; expected a finite number ≥ 0"),
    (lambda m: m["adapter"]["config"].pop("position"), "key 'adapter.config.position' is missing"),
    (lambda m: m.update(files=[1, 2]), "key 'files' is [1, 2]; expected an object with 'model.safetensors'"),
    (lambda m: m["transform"].update(center_crop=[32]), "key 'transform.center_crop' is [32]; expected a list of 2"),
], ids=["nan-scale", "dtype", "class-twice", "template", "lambda", "no-position", "files", "crop"])
def test_an_edited_bundle_json_is_a_one_line_error_naming_the_key(run, tmp_path, edit, message):
    """bundle.json is plain JSON that the tensor files' sha256 records do not cover (issue 22)."""
    bundle = _edited(run, tmp_path, edit)
    with pytest.raises(UserError) as e:
        Bundle.load(bundle, device="cpu")
    assert str(e.value).startswith(f"{bundle / 'bundle.json'}: {message}") and "\n" not in str(e.value)
    assert str(e.value).endswith("; re-export the bundle (`ballad-pipe export`)")


@pytest.mark.parametrize("edit, kind", [
    (lambda m: m["adapter"]["config"].update(position="text"), "a text linear adapter of 64 dims"),
    (lambda m: m["adapter"]["config"].update(form="relu"), "a visual relu adapter of 64 dims"),
    (lambda m: m.update(adapter=None), "no adapter"),
], ids=["position", "form", "none"])
def test_the_adapter_tensors_must_be_those_bundle_json_describes(run, tmp_path, edit, kind):
    bundle = _edited(run, tmp_path, edit)
    with pytest.raises(UserError, match=rf"^{re.escape(str(bundle))}/head.safetensors: holds the adapter tensors "
                                        rf"{{'visual.linear.weight': \(64, 64\)}}, but bundle.json describes "
                                        rf"{kind}; re-export the bundle$"):
        Bundle.load(bundle, device="cpu")


def test_classes_file_replaces_or_adds_names(run, tmp_path):
    bundle = Bundle.load(run.bundle, device="cpu")
    stored = dict(zip(bundle.classnames, bundle.text))
    # The bundle's text tower and templates give the store's class embeddings back.
    again, _ = text_embeddings(bundle.backbone, bundle.classnames, bundle.meta["templates"], "cpu")
    np.testing.assert_allclose(again, torch.stack(list(stored.values())).numpy(), atol=1e-5)

    images = [_image(s) for s in run.samples[:4]]
    before = bundle.logits(images)
    picked = [bundle.classnames[i] for i in (5, 0, 2)]
    bundle.set_classes(picked + ["hexagon"])
    after = bundle.logits(images)
    torch.testing.assert_close(after[:, :3], before[:, [5, 0, 2]])
    hexagon, _ = text_embeddings(bundle.backbone, ["hexagon"], bundle.meta["templates"], "cpu")
    torch.testing.assert_close(bundle.text[3], torch.from_numpy(hexagon[0]))
    with pytest.raises(UserError, match="'hexagon' is listed 2 times"):
        bundle.set_classes(bundle.classnames + ["hexagon"])

    (tmp_path / "extra.txt").write_text("hexagon\n\nstar\n")
    (tmp_path / "img.png").write_bytes(run.samples[0].image)
    r = CliRunner().invoke(main, ["predict", "--bundle", str(run.bundle), str(tmp_path / "img.png"), "--json",
                                  "--top-k", "100", "--add-classes", str(tmp_path / "extra.txt")])
    assert r.exit_code == 0, r.output
    classes = [p["class"] for p in json.loads(r.stdout)["predictions"]]
    assert sorted(classes) == sorted(bundle.meta["classnames"] + ["hexagon", "star"])
    r = CliRunner().invoke(main, ["predict", "--bundle", str(run.bundle), str(tmp_path / "img.png"), "--json",
                                  "--classes", str(tmp_path / "extra.txt")])
    assert r.exit_code == 0, r.output
    assert [p["class"] for p in json.loads(r.stdout)["predictions"]] in (["hexagon", "star"], ["star", "hexagon"])


def test_a_store_of_lifts_eval_transform_exports_and_predicts_its_features(run, tiny_data, tmp_path):
    """`extract --eval-transform lift` (Resize 8/7 bilinear + centre crop, TTE +24 bilinear): the bundle
    records the recipe, rebuilds that transform on load, and its features are the store's."""
    from stages.evaluate.score import view_logits

    features = tmp_path / "lift.zarr"
    extract(str(run.ckpt), tiny_data, features, splits=["train", "test"], batch_size=64, workers=0,
            test_views="five-crop", eval_transform="lift", dtype="float32")
    bundle = tmp_path / "lift.bundle"
    export(run.ckpt, "none", features, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["eval_recipe"] == "lift"
    assert meta["transform"]["resize_shorter_side"] == 36 and meta["transform"]["interpolation"] == "bilinear"
    loaded = Bundle.load(bundle, device="cpu")
    store = FeatureStore.open(features)
    images = [_image(s) for s in run.samples[:8]]
    text = torch.from_numpy(store.text_embeddings())
    plain = torch.from_numpy(store.features("test")[0][:8]).float()
    expected = view_logits(loaded.adapter, plain[None], text)
    torch.testing.assert_close(loaded.logits(images), expected, atol=1e-4, rtol=1e-4)
    tta = torch.from_numpy(store.tta_features("test")[:, :8]).float()
    torch.testing.assert_close(loaded.logits(images, tta="five-crop"), view_logits(loaded.adapter, tta, text),
                               atol=1e-4, rtol=1e-4)
