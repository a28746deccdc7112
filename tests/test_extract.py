"""`ballad-pipe extract`: content (views included), determinism, bad input, locks, SIGKILL + resume,
two torchrun processes."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

import store.feature_writer as feature_writer
import store.features as features
from cli import main
from pipeline.encode import split_transform
from pipeline.errors import UserError
from pipeline.runtime import sha256_file
from pipeline.views import TEST_VIEWS, TrainViews, tta_views, view_rng_seed
from stages.extract.run import extract
from stages.extract.config import MAX_TRAIN_VIEWS
from stages.extract.meta import resolve_templates
from store.features import FeatureStore
from store.shards import load_dataset, read_shard, write_shard
from test_images import HOSTILE

CHUNK_ROWS = 96  # several chunks per split, so processes and resumes write chunk by chunk
VIEWS = {"train_views": 2, "test_views": "five-crop"}  # the reference store has both kinds of views
VIEW_ARGS = ["--train-views", "2", "--test-views", "five-crop"]
CHILD = """
import os, signal, sys
import store.feature_writer as writer
from cli import main

writer.CHUNK_ROWS = {chunk_rows}
if sys.argv[1] == "kill-staging":  # SIGKILL right after the second finished train shard
    stage, staged = writer.SplitWriter.stage, []

    def stage_then_die(self, *args, **kw):
        stage(self, *args, **kw)
        staged.append(args[0])
        if len(staged) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    writer.SplitWriter.stage = stage_then_die
main(["extract", *sys.argv[2:]], prog_name="ballad-pipe")
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_backbone):
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"model": "ballad-tiny", "pretrained": None}))
    return path



@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, ckpt):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setattr(feature_writer, "CHUNK_ROWS", CHUNK_ROWS)
    out = tmp_path_factory.mktemp("ref") / "features.zarr"
    try:
        extract(str(ckpt), tiny_data, out, batch_size=32, workers=2, **VIEWS)
    finally:
        mp.undo()
        torch.set_num_threads(before)
    return out


def _files(path: Path) -> dict:
    """Every file's bytes but the root metadata (which names the run: created time, --out)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.relative_to(path) != Path("zarr.json")}


def _same_store(a: Path, b: Path):
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name
    drop = ("created", "command")
    ma, mb = FeatureStore.open(a).meta, FeatureStore.open(b).meta
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}


def test_store_holds_model_features_in_shard_order(reference, tiny_data, tiny_backbone, ckpt):
    fs = FeatureStore.open(reference)
    data = load_dataset(tiny_data)
    assert fs.splits == ["train", "val", "test"]
    assert fs.fingerprint["checkpoint_sha256"] == sha256_file(ckpt) and fs.fingerprint["model"] == "ballad-tiny"
    assert fs.train_class_counts.tolist() == data.split("train").class_counts
    assert fs.classnames == data.classnames and fs.embed_dim == tiny_backbone.embed_dim
    assert fs.logit_scale == pytest.approx(tiny_backbone.model.logit_scale.exp().item())
    samples = [s for url in data.urls("test") for s in read_shard(url)]
    image, labels = fs.features("test")
    assert list(fs.keys("test")) == [s.key for s in samples]
    assert labels.tolist() == [s.label for s in samples]
    picks = [0, len(samples) - 1]
    batch = torch.stack([tiny_backbone.eval_transform(Image.open(io.BytesIO(samples[i].image))) for i in picks])
    with torch.inference_mode():
        want = tiny_backbone.model.eval().encode_image(batch)  # unnormalised, as stored
    torch.testing.assert_close(torch.from_numpy(image[picks]).float(), want, atol=2e-3, rtol=2e-3)
    from pipeline.text import class_prompts, encode_text, tokenize_trimmed

    tokens = tokenize_trimmed(tiny_backbone.tokenizer, class_prompts(data.classnames, data.template))
    with torch.inference_mode():
        text = encode_text(tiny_backbone.model, tokens, normalize=True)
    torch.testing.assert_close(fs.text_embeddings("cpu"), text, atol=1e-5, rtol=1e-5)
    assert fs.prompts == class_prompts(data.classnames, data.template)


def test_same_command_gives_identical_store(reference, tiny_data, ckpt, tmp_path, monkeypatch, single_thread):
    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", CHUNK_ROWS)
    done = extract(str(ckpt), tiny_data, tmp_path / "again.zarr", batch_size=32, workers=0, **VIEWS)
    assert done == {"train": 6, "val": 1, "test": 2}
    _same_store(reference, tmp_path / "again.zarr")
    again = extract(str(ckpt), tiny_data, tmp_path / "again.zarr", batch_size=32, workers=0, **VIEWS)
    assert again == {"train": 0, "val": 0, "test": 0}


def _image(sample):
    return Image.open(io.BytesIO(sample.image)).convert("RGB")


@pytest.fixture(scope="module")
def float32_views(tmp_path_factory, tiny_data, ckpt):
    """train and val with views, in float32: the random-init model maps an image's views to features
    only ~1e-4 apart, which float16 rounding (~5e-5) would blur."""
    out = tmp_path_factory.mktemp("f32") / "views.zarr"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(str(ckpt), tiny_data, out, splits=["train", "val"], batch_size=64, workers=0, dtype="float32", **VIEWS)
    finally:
        torch.set_num_threads(before)
    return FeatureStore.open(out)


def test_views_are_seeded_train_transforms_and_lift_crops(float32_views, reference, tiny_data, tiny_backbone):
    from torchvision import transforms as T

    fs, data, model = float32_views, load_dataset(tiny_data), tiny_backbone.model.eval()
    ref = FeatureStore.open(reference)
    assert ref.num_views("train") == 2 and ref.num_views("test") == 0 and ref.tta_mode("train") is None
    assert ref.tta_mode("val") == ref.tta_mode("test") == "five-crop"
    assert ref.meta["train_transform"] == repr(tiny_backbone.train_transform) and ref.meta["view_seed"] == 0
    # Train view v of sample `key`: the train transform drawn from torch seeded with view_rng_seed(0, key, v).
    train = [s for url in data.urls("train") for s in read_shard(url)]
    picks, want = [0, len(train) - 1], []
    for i in picks:
        for v in range(2):
            torch.manual_seed(view_rng_seed(0, train[i].key, v))
            want.append(tiny_backbone.train_transform(_image(train[i])))
    with torch.inference_mode():
        want = model.encode_image(torch.stack(want)).view(len(picks), 2, -1).transpose(0, 1)
    got = torch.from_numpy(fs.views("train")[:, picks])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    eval_feature = torch.from_numpy(fs.features("train")[0][picks])
    assert not torch.allclose(got.flip(0), want, atol=1e-6, rtol=1e-4)  # the views differ from each other
    assert not torch.allclose(got[0], eval_feature, atol=1e-6, rtol=1e-4)  # and from the eval feature
    # Test-time views: torchvision's FiveCrop(32) of the image resized to 32 + round(32 · 24 / 224) = 35.
    val = [s for url in data.urls("val") for s in read_shard(url)]
    crops = T.Compose([T.Resize(35, interpolation=T.InterpolationMode.BICUBIC), T.FiveCrop(32)])(_image(val[5]))
    normalize = tiny_backbone.eval_transform.transforms[-1]
    with torch.inference_mode():
        want = model.encode_image(torch.stack([normalize(T.functional.to_tensor(c)) for c in crops]))
    got = torch.from_numpy(fs.tta_features("val")[:, 5])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(got.roll(1, 0), want, atol=1e-6, rtol=1e-4)


def test_train_views_are_a_pure_function_of_seed_key_and_index(tiny_backbone):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    per_image, _ = split_transform(tiny_backbone.train_transform)
    views = TrainViews(per_image, 3, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = views(img, "k1")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left where it was
    assert a.shape == (3, 32, 32, 3) and a.dtype == torch.uint8 and torch.equal(a, views(img, "k1"))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, views(img, "k2")) and not torch.equal(a, TrainViews(per_image, 3, seed=1)(img, "k1"))
    assert torch.equal(TrainViews(per_image, 5, seed=0)(img, "k1")[:3], a)  # more views add, never reshuffle
    for v in range(3):  # view v is the whole train transform drawn after seeding torch with view_rng_seed
        torch.manual_seed(view_rng_seed(0, "k1", v))
        full = tiny_backbone.train_transform(img)
        torch.testing.assert_close(tiny_backbone.train_transform.transforms[-1](a[v].permute(2, 0, 1) / 255), full)


@pytest.mark.parametrize("mode", ["flip", "five-crop", "ten-crop"])
def test_tta_views_are_lifts_resize_and_crops(tiny_backbone, mode):
    from torchvision import transforms as T

    from pipeline.models import build_transforms

    assert tta_views(build_transforms(224)[1], mode).resize.size == 248  # LIFT: 224 + 24
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    big = T.Resize(35, interpolation=T.InterpolationMode.BICUBIC)(img)
    centre = T.CenterCrop(32)(big)
    crops = {"flip": [centre, T.functional.hflip(centre)], "five-crop": T.FiveCrop(32)(big),
             "ten-crop": T.TenCrop(32)(big)}[mode]
    normalize = tiny_backbone.eval_transform.transforms[-1]
    want = torch.stack([normalize(T.functional.to_tensor(c)) for c in crops])
    got = tta_views(tiny_backbone.eval_transform, mode)(img)
    assert got.shape == (TEST_VIEWS[mode], 3, 32, 32)
    torch.testing.assert_close(got, want)


def test_resume_with_other_view_settings_is_refused(reference, tiny_data, ckpt, tmp_path):
    store = tmp_path / "views.zarr"
    shutil.copytree(reference, store)
    for change, named in (({"train_views": 3}, r"train_views \(2\)"), ({"train_views": 0}, r"train_views \(2\)"),
                          ({"view_seed": 1}, r"view_seed \(0\)"),
                          ({"test_views": "flip"}, r"test_views \(five-crop\)")):
        with pytest.raises(UserError, match=rf"holds a store made with another {named}; .* --overwrite"):
            extract(str(ckpt), tiny_data, store, splits=["val"], workers=0, **{**VIEWS, **change})
    _same_store(reference, store)


def test_second_extract_on_a_locked_store_leaves_it_alone(reference, tiny_data, ckpt, tmp_path):
    from pipeline.locks import exclusive_lock

    store = tmp_path / "busy.zarr"
    shutil.copytree(reference, store)
    zarr.open_group(str(store), mode="r+")["test"].attrs["complete"] = False  # the first run is still on test
    before = {str(p): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with exclusive_lock(store):  # held by that first run
        with pytest.raises(UserError, match=rf"--out {store}: process {os.getpid()} is writing it"):
            extract(str(ckpt), tiny_data, store, batch_size=32, workers=0, **VIEWS)
        r = CliRunner().invoke(main, ["extract", "--ckpt", str(ckpt), "--data", str(tiny_data), "--out", str(store),
                                      *VIEW_ARGS])
        assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "is writing it" in r.output
    assert {str(p): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def _child(tmp_path, mode, args, world_size=1):
    """Run the CLI in fresh processes: one, or ``world_size`` ranks joined as torchrun would join them."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(chunk_rows=CHUNK_ROWS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if world_size > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size))
    procs = [subprocess.Popen([sys.executable, str(script), mode, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)} if world_size > 1 else env)
             for r in range(world_size)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(logs)[-3000:]


@pytest.mark.slow
def test_interrupted_runs_resume_to_identical_store(reference, tiny_data, ckpt, tmp_path, monkeypatch, single_thread,
                                                    caplog):
    out = tmp_path / "killed.zarr"
    args = ["--ckpt", str(ckpt), "--data", str(tiny_data), "--out", str(out), "--splits", "train",
            "--batch-size", "32", "--workers", "1", *VIEW_ARGS]
    rc, log = _child(tmp_path, "kill-staging", args)
    assert rc == [-9], log
    fs = FeatureStore.open(out)
    assert not fs.is_complete("train")
    with pytest.raises(UserError, match=r"split 'train' is incomplete.*--ckpt .*--splits train` finishes it"):
        fs.features("train")
    staged = {p.name: p.stat().st_mtime_ns for p in (out / features.STAGING / "train").glob("*.npz")}
    assert len(staged) == 2

    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", CHUNK_ROWS)
    create = feature_writer._array

    def crash_writing_train(group, name, *a, **kw):  # what a kill leaves mid-finish: arrays made, not filled
        create(group, name, *a, **kw)
        if name == "key" and group.path == "train":
            raise KeyboardInterrupt

    monkeypatch.setattr(feature_writer, "_array", crash_writing_train)
    with caplog.at_level("INFO", logger="ballad.extract"), pytest.raises(KeyboardInterrupt):
        extract(str(ckpt), tiny_data, out, batch_size=32, workers=1, **VIEWS)
    assert "train: 2 of 6 shard(s) already extracted, computing 4" in caplog.text
    assert all((out / features.STAGING / "train" / n).stat().st_mtime_ns == t for n, t in staged.items())
    assert not FeatureStore.open(out).is_complete("train")
    monkeypatch.setattr(feature_writer, "_array", create)
    assert extract(str(ckpt), tiny_data, out, batch_size=32, workers=1, **VIEWS) == {"train": 0, "val": 1, "test": 2}
    _same_store(reference, out)


@pytest.mark.slow
def test_two_torchrun_ranks_match_one_process(reference, tiny_data, ckpt, tmp_path):
    out = tmp_path / "ranks.zarr"
    args = ["--ckpt", str(ckpt), "--data", str(tiny_data), "--out", str(out), "--batch-size", "32",
            "--workers", "0", "--device", "cpu", *VIEW_ARGS]
    rc, log = _child(tmp_path, "plain", args, world_size=2)
    assert rc == [0, 0], log
    _same_store(reference, out)


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory, tiny_data):
    """tiny_data with one undecodable image in val."""
    root = tmp_path_factory.mktemp("corrupt") / "shapes"
    shutil.copytree(tiny_data, root)
    shard = root / load_dataset(root).split("val").shards[0]
    samples = list(read_shard(shard))
    samples[3] = samples[3].__class__(samples[3].key, "png", b"\x89PNG not really", samples[3].label)
    shard.unlink()
    write_shard(shard, samples)
    return root, samples[3].key


def test_corrupt_images_are_skipped_and_recorded(corrupt_data, tmp_path):
    root, bad = corrupt_data
    extract("none", root, tmp_path / "f.zarr", model="ballad-tiny", splits=["val"], workers=1, skip_bad=True)
    fs = FeatureStore.open(tmp_path / "f.zarr")
    assert fs.skipped("val") == [bad] and bad not in fs.keys("val")
    assert len(fs.features("val")[1]) == load_dataset(root).split("val").num_samples - 1
    with pytest.raises(UserError, match=f"sample '{bad}'.*unreadable"):
        extract("none", root, tmp_path / "s.zarr", model="ballad-tiny", splits=["val"], workers=1)


def _extract_cli(data, out, *args):
    return CliRunner().invoke(main, ["extract", "--ckpt", "none", "--model", "ballad-tiny", "--data", str(data),
                                     "--out", str(out), "--splits", "val", "--workers", "1", "--device", "cpu", *args])


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_image_stops_extract_with_one_line_or_is_skipped_and_recorded(tiny_data, tmp_path, kind):
    suffix, data, reason = HOSTILE[kind]
    root = tmp_path / "shapes"
    shutil.copytree(tiny_data, root)
    shard = root / load_dataset(root).split("val").shards[0]
    samples = list(read_shard(shard))
    bad = samples[5].key
    samples[5] = samples[5].__class__(bad, suffix, data, samples[5].label)
    shard.unlink()
    write_shard(shard, samples)
    result = _extract_cli(root, tmp_path / "a.zarr")  # read in a loader worker
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert re.fullmatch(rf"Error: sample '{bad}' in .*{shard.name}: unreadable image \({re.escape(reason)}\); pass "
                        r"--skip-bad to skip unreadable images\n", result.output), result.output
    result = _extract_cli(root, tmp_path / "b.zarr", "--skip-bad")
    assert result.exit_code == 0, result.output
    fs = FeatureStore.open(tmp_path / "b.zarr")
    assert fs.skipped("val") == [bad] and len(fs.keys("val")) == load_dataset(root).split("val").num_samples - 1


def test_max_pixels_reaches_the_loader_workers_and_is_checked_first(tiny_data, tmp_path):
    result = _extract_cli(tiny_data, tmp_path / "a.zarr", "--max-pixels", "1023")  # the images are 32 × 32
    assert result.exit_code != 0 and re.fullmatch(r"Error: sample '\w+' in .*: unreadable image \(decompression "
                                                  r"bomb: 32×32 = 1,024 pixels, above --max-pixels 1,023\); pass "
                                                  r"--skip-bad to skip unreadable images\n", result.output)
    assert _extract_cli(tiny_data, tmp_path / "b.zarr", "--max-pixels", "1024").exit_code == 0
    result = _extract_cli(tiny_data, tmp_path / "c.zarr", "--max-pixels", "0")
    assert result.exit_code != 0 and result.output == "Error: --max-pixels 0: must be at least 1\n"
    assert not (tmp_path / "c.zarr").exists()


def test_bad_input_is_refused_with_one_line(tiny_data, ckpt, reference, tmp_path):
    with pytest.raises(UserError, match="no split 'holdout'"):
        extract(str(ckpt), tiny_data, tmp_path / "f.zarr", splits=["holdout"])
    with pytest.raises(UserError, match=r"--model RN50: checkpoint .* is a ballad-tiny \(per final.json\)"):
        extract(str(ckpt), tiny_data, tmp_path / "f.zarr", model="RN50")
    with pytest.raises(UserError, match="--model is required"):
        extract("none", tiny_data, tmp_path / "f.zarr")
    state = torch.load(ckpt, weights_only=True)
    state["text_projection"] = state["text_projection"][:, :3]
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="does not match architecture ballad-tiny"):
        extract(str(tmp_path / "wrong.pt"), tiny_data, tmp_path / "f.zarr", model="ballad-tiny")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: not a readable state-dict checkpoint"):
        extract(str(tmp_path / "junk.pt"), tiny_data, tmp_path / "f.zarr", model="ballad-tiny")
    store = tmp_path / "ref.zarr"
    shutil.copytree(reference, store)
    with pytest.raises(UserError, match="holds a store made with another checkpoint_sha256.*--overwrite"):
        extract("none", tiny_data, store, model="ballad-tiny", splits=["val"], workers=0)
    extract("none", tiny_data, store, model="ballad-tiny", splits=["val"], workers=0, overwrite=True)
    assert FeatureStore.open(store).splits == ["val"]
    for change, message in (({"train_views": -1}, "--train-views -1: must be between 0 (none) and 1024"),
                            ({"train_views": MAX_TRAIN_VIEWS + 1}, "--train-views 1025"),
                            ({"view_seed": -3}, "--view-seed -3: must be 0 or more"),
                            ({"test_views": "six-crop"},
                             "--test-views six-crop: choose one of none, flip, five-crop, ten-crop")):
        with pytest.raises(UserError, match=re.escape(message)):
            extract(str(ckpt), tiny_data, tmp_path / "v.zarr", **change)
    assert not (tmp_path / "v.zarr").exists()
    result = CliRunner().invoke(main, ["extract", "--ckpt", str(ckpt), "--data", str(tiny_data),
                                       "--out", str(tmp_path / "v.zarr"), "--train-views", "5000"])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        "Error: --train-views 5000: must be between 0 (none) and 1024"]
    result = CliRunner().invoke(main, ["extract", "--ckpt", str(tmp_path / "nope.pt"), "--data", str(tiny_data),
                                       "--out", str(tmp_path / "f.zarr")])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [f"Error: --ckpt {tmp_path / 'nope.pt'}: no such checkpoint file "
                                                  "(or pass --ckpt none for the factory's weights)"]


def test_ensemble_averages_normalised_prompt_embeddings(tiny_data, ckpt, tiny_backbone, tmp_path):
    extract(str(ckpt), tiny_data, tmp_path / "e.zarr", splits=["val"], workers=0, templates="ensemble")
    fs = FeatureStore.open(tmp_path / "e.zarr")
    from pipeline.text import ENSEMBLE_TEMPLATES, encode_text, tokenize_trimmed

    names = fs.classnames
    assert fs.prompts[:2] == [ENSEMBLE_TEMPLATES[0].format(names[0]), ENSEMBLE_TEMPLATES[1].format(names[0])]
    with torch.inference_mode():
        emb = encode_text(tiny_backbone.model, tokenize_trimmed(tiny_backbone.tokenizer, fs.prompts), normalize=True)
    want = torch.nn.functional.normalize(emb.view(len(names), len(ENSEMBLE_TEMPLATES), -1).mean(1), dim=-1)
    torch.testing.assert_close(fs.text_embeddings("cpu"), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="dtype"):  # a store's settings are fixed once made
        extract(str(ckpt), tiny_data, tmp_path / "e.zarr", splits=["val"], workers=0, templates="ensemble",
                dtype="float32")


def test_template_file_is_checked_line_by_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}.\n\na sketch of {}\n")
    assert resolve_templates(str(f), "x {}") == ["a photo of a {}.", "a sketch of {}"]
    f.write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(UserError, match=r"t.txt:2: template 'no placeholder' must hold exactly one \{\}"):
        resolve_templates(str(f), "x {}")
    # format fields that look up attributes, index, pad or repeat: refused, not applied to the class names
    for hostile in ("{0.__class__.__init__}{}", "{} {}", "{:>99999}", "{!r}", "{x}", "{"):
        f.write_text(f"a photo of a {{}}.\n{hostile}\n")
        with pytest.raises(UserError, match=r"^.*t.txt:2: template .* (must hold exactly one|is not a template)"):
            resolve_templates(str(f), "x {}")
    f.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(UserError, match=r"^--templates .*t.txt: not a UTF-8 text file"):
        resolve_templates(str(f), "x {}")
    with pytest.raises(UserError, match="--templates fancy: not 'single', 'ensemble' or an existing file"):
        resolve_templates("fancy", "x {}")


def test_documented_plain_zarr_example(reference, capsys):
    doc = (Path(__file__).parents[1] / "docs" / "feature-store.md").read_text()
    example = doc.split("With plain zarr")[1].split("```python\n")[1].split("```")[0]
    assert len(example.strip().splitlines()) == 5
    exec(example.replace("features/phase_a.zarr", str(reference)), {})
    assert 0 <= float(capsys.readouterr().out) <= 1


def test_documented_plain_zarr_views_example(reference, capsys):
    doc = (Path(__file__).parents[1] / "docs" / "feature-store.md").read_text()
    example = doc.split("Views with plain zarr")[1].split("```python\n")[1].split("```")[0]
    exec(example.replace("features/phase_a.zarr", str(reference)), {})
    out = capsys.readouterr().out.splitlines()
    fs = FeatureStore.open(reference)
    n, d, rows = fs.num_samples("train"), fs.embed_dim, zarr.open_group(str(reference))["train/image"].chunks[0]
    n_class_0 = int((fs.features("train")[1] == 0).sum())
    assert out[0] == f"2 (2, {n}, {d}) (1, {rows}, {d}) (2, {n_class_0}, {d})"  # views chunked as image's rows
    assert 0 <= float(out[1]) <= 1


def test_dvc_passes_the_view_settings():
    import yaml

    from stages.evaluate.config import TTA_MODES
    from test_dvc_yaml import stages

    repo = Path(__file__).parents[1]
    # The demo's params.yaml and every paper recipe (`cp configs/X.yaml params.yaml`) set them all.
    for path in [repo / "params.yaml", *sorted((repo / "configs").glob("*.yaml"))]:
        params = yaml.safe_load(path.read_text())
        views = params["views"]
        assert 0 <= views["train-views"] <= MAX_TRAIN_VIEWS and views["view-seed"] >= 0, path
        assert params["extract"]["test-views"] in TEST_VIEWS and params["evaluate"]["tta"] in TTA_MODES, path
    extract, zero_shot = stages()["extract"], stages()["extract_zero_shot"]
    assert "${extract} ${views}" in extract["cmd"] and "views" in extract["params"]
    # The zero-shot store trains no adapter: test views only, and no re-run when the train views change.
    assert "${extract}" in zero_shot["cmd"] and "${views}" not in zero_shot["cmd"] and "views" not in zero_shot["params"]



@pytest.mark.parametrize("meta, message", [
    ({"model": 3}, "key 'model' is 3; expected a non-empty one-line string"),
    ({"pretrained": None}, "key 'model' is missing"),
    ({"model": "ballad-tiny", "pretrained": ["openai"]}, "key 'pretrained' is ['openai']; expected null or a one-line"),
    ({"model": "ballad-tiny\nRN50"}, r"key 'model' is 'ballad-tiny\nRN50'"),
    ({"model": "ballad-tiny", "logit_scale": float("nan")}, "key 'logit_scale' is nan; expected a finite number > 0"),
    ({"model": "ballad-tiny", "tuning": {"tune": "lora2"}}, "key 'tuning.tune' is 'lora2'; expected one of full, bias"),
    (["ballad-tiny"], "holds ['ballad-tiny']; expected a JSON object"),
], ids=["model-type", "no-model", "pretrained-type", "model-line-break", "nan-scale", "tune", "not-an-object"])
def test_an_edited_final_json_is_a_one_line_error_naming_the_key(tmp_path, meta, message):
    """extract reads the architecture and the pretrained tag from the final.json beside --ckpt: a file
    anyone can edit, checked key by key (issue 22) before anything is built from it."""
    from stages.extract.meta import resolve_checkpoint

    (tmp_path / "final.pt").write_bytes(b"weights")
    (tmp_path / "final.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        resolve_checkpoint(str(tmp_path / "final.pt"), None, None)
    assert str(e.value).startswith(f"{tmp_path / 'final.json'}: {message}")
    assert str(e.value).endswith("; fix it, or delete it and pass --model") and "\n" not in str(e.value)
