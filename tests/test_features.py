"""The feature store on its own: synthetic stores, the resumable split writer, refusals."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import zarr

import store.feature_writer as feature_writer
import store.features as features
from pipeline.errors import UserError
from store.features import FeatureStore, make_fingerprint
from store.feature_writer import SplitWriter, chunk_rows, create_store, write_store, write_text

K, D = 4, 8


def _synthetic(path, rng, n_train=50, dtype="float16", **kw):
    image = {"train": rng.normal(size=(n_train, D)), "test": rng.normal(size=(12, D))}
    labels = {"train": rng.integers(0, K, n_train), "test": rng.integers(0, K, 12)}
    return write_store(path, image=image, labels=labels, keys=None, text_embeddings=rng.normal(size=(K, D)) * 3,
                       classnames=[f"c{i}" for i in range(K)], logit_scale=100.0,
                       train_class_counts=np.bincount(labels["train"], minlength=K), dtype=dtype, **kw), image, labels


def test_roundtrip_numpy_and_torch(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    fs, image, labels = _synthetic(tmp_path / "s.zarr", rng)
    fs = FeatureStore.open(tmp_path / "s.zarr")
    assert fs.splits == ["train", "test"] and fs.is_complete("train")
    x, y = fs.features("train")
    assert x.dtype == np.float16 and y.dtype == np.int64
    np.testing.assert_array_equal(x, image["train"].astype(np.float16))
    np.testing.assert_array_equal(y, labels["train"])
    assert list(fs.keys("test")[:2]) == ["test_000000", "test_000001"]
    xt, yt = fs.features("test", device="cpu", dtype=torch.float32)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    torch.testing.assert_close(xt, torch.from_numpy(image["test"].astype(np.float16)).float())
    text = fs.text_embeddings()
    assert text.dtype == np.float32 and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-6)
    assert fs.prompts[0] == "a photo of a c0." and fs.num_classes == K and fs.embed_dim == D
    assert fs.logit_scale == 100.0 and fs.train_class_counts.dtype == np.int64
    assert set(fs.fingerprint) == {"model", "pretrained", "checkpoint_sha256", "classnames_sha256", "embed_dim"}


def test_float32_store_keeps_exact_values(tmp_path):
    fs, image, _ = _synthetic(tmp_path / "s.zarr", np.random.default_rng(1), dtype="float32")
    np.testing.assert_array_equal(fs.features("train")[0], image["train"].astype(np.float32))


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(UserError, match="no such feature store"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a"):
        FeatureStore.open(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(UserError, match="not a ballad feature store"):
        FeatureStore.open(tmp_path / "other.zarr")
    fs, _, _ = _synthetic(tmp_path / "s.zarr", np.random.default_rng(2))
    with pytest.raises(UserError, match="no split 'val'"):
        fs.features("val")


def test_chunk_rows_are_equal_sized(monkeypatch):
    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", 100)
    for n in (1, 99, 100, 101, 250, 1001):
        rows = chunk_rows(n)
        n_chunks = -(-n // rows)
        assert rows <= 100 and n_chunks * rows - n < n_chunks  # padding under one row per chunk


def _stage_parts(writer, rng, counts):
    rows = {"image": [], "label": [], "key": []}
    for s in reversed(range(len(counts))):  # finishing order must not matter
        n = counts[s]
        image, label = rng.normal(size=(n, D)).astype(np.float16), rng.integers(0, K, n)
        keys = [f"s{s}_{i}" for i in range(n)]
        writer.stage(s, image, label, keys, skipped=[f"bad{s}"] if n == 0 else [])
        rows["image"].insert(0, image), rows["label"].insert(0, label), rows["key"].insert(0, keys)
    return {k: np.concatenate(v) for k, v in rows.items()}


def _attrs():
    return {"format": features.FORMAT, "fingerprint": make_fingerprint("m", None, None, ["a"], D), "dtype": "float16",
            "classnames": ["a"], "embed_dim": D, "logit_scale": 1.0, "train_class_counts": [1],
            "command": "ballad-pipe extract --out x"}


def _create(path):
    """A store as extract starts it: root attributes and class text, no split yet."""
    group = create_store(path, _attrs())
    write_text(group, np.ones((1, D)), ["a photo of a a."], ["a photo of a {}."])
    return group


def test_split_writer_refuses_unfinished_then_writes_in_shard_order(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", 7)  # several chunks, crossing shard boundaries
    group = _create(tmp_path / "s.zarr")
    writer = SplitWriter(group, "train", 5, "float16")
    staging = tmp_path / "s.zarr" / features.STAGING / "train"
    staging.mkdir(parents=True)
    (staging / ".000003.npz.abc.tmp").write_bytes(b"half a shard")  # a killed writer's
    writer.prepare(is_main=True)
    assert not list(staging.glob(".*.tmp"))
    expect = _stage_parts(writer, np.random.default_rng(3), [9, 0, 4, 13, 5])
    with pytest.raises(UserError, match=r"incomplete.*`ballad-pipe extract --out x --splits train` finishes it"):
        FeatureStore.open(tmp_path / "s.zarr").features("train")
    writer.finish(D)
    fs = FeatureStore.open(tmp_path / "s.zarr")
    x, y = fs.features("train")
    np.testing.assert_array_equal(x, expect["image"])
    np.testing.assert_array_equal(y, expect["label"])
    assert list(fs.keys("train")) == list(expect["key"])
    assert fs.skipped("train") == ["bad1"] and fs.split_attrs("train")["num_samples"] == 31
    assert not (tmp_path / "s.zarr" / features.STAGING).exists()


def test_two_processes_write_disjoint_chunks_of_the_same_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", 5)
    stores = {}
    for world in (1, 2):
        group = _create(tmp_path / f"w{world}.zarr")
        writer = SplitWriter(group, "train", 4, "float16")
        writer.prepare(is_main=True)
        _stage_parts(writer, np.random.default_rng(4), [6, 7, 1, 9])
        sync = threading.Barrier(world)
        workers = [threading.Thread(target=writer.finish, args=(D, r, world, sync.wait)) for r in range(world)]
        [t.start() for t in workers]
        [t.join() for t in workers]
        stores[world] = FeatureStore.open(tmp_path / f"w{world}.zarr")
    for a, b in zip(stores[1].features("train"), stores[2].features("train")):
        np.testing.assert_array_equal(a, b)
    assert list(stores[1].keys("train")) == list(stores[2].keys("train"))


def test_create_store_resumes_same_run_and_refuses_another(tmp_path):
    path = tmp_path / "s.zarr"
    group = create_store(path, _attrs())
    group.attrs["splits"] = ["train"]
    created = group.attrs["created"]
    again = create_store(path, {**_attrs(), "command": "new"})
    assert again.attrs["created"] == created and again.attrs["splits"] == ["train"]
    other = {**_attrs(), "fingerprint": {"model": "m", "checkpoint_sha256": "beef"}}
    with pytest.raises(UserError, match="checkpoint_sha256.*--overwrite"):
        create_store(path, other)
    with pytest.raises(UserError, match="dtype"):
        create_store(path, {**_attrs(), "dtype": "float32"})
    assert create_store(path, other, overwrite=True).attrs["splits"] == []
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(UserError, match="not a feature store"):
        create_store(tmp_path / "junk", _attrs())


def test_a_split_keeps_one_decode_path_while_other_splits_may_differ(tmp_path):
    """GPU-decoded pixels differ slightly from PIL's: a resumed split must not mix the two paths."""
    path = tmp_path / "s.zarr"
    create_store(path, {**_attrs(), "decode": {"train": "cpu"}})
    with pytest.raises(UserError, match="another --decode for split train"):
        create_store(path, {**_attrs(), "decode": {"train": "gpu"}})
    extended = create_store(path, {**_attrs(), "decode": {"test": "gpu"}})
    assert dict(extended.attrs["decode"]) == {"train": "cpu", "test": "gpu"}


def test_plain_zarr_reads_the_documented_layout(tmp_path):
    fs, image, labels = _synthetic(tmp_path / "s.zarr", np.random.default_rng(5))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root["train"].attrs["complete"] is True
    np.testing.assert_array_equal(root["train/image"][:], image["train"].astype(np.float16))
    assert root["train/label"].dtype == np.int32 and root["text/embeddings"].shape == (K, D)
    assert root.attrs["classnames"] == fs.classnames and root["train/key"][0] == "train_000000"


def _with_views(path, rng, n_train=50, n_test=12, v=3, t=5):
    views = rng.normal(size=(v, n_train, D))
    tta = rng.normal(size=(t, n_test, D))
    fs, image, labels = _synthetic(path, rng, n_train, views={"train": views}, tta={"test": ("five-crop", tta)})
    return fs, views.astype(np.float16), tta.astype(np.float16)


def test_views_and_tta_roundtrip_and_readers(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", 16)  # several row chunks per view
    fs, views, tta = _with_views(tmp_path / "v.zarr", np.random.default_rng(6))
    assert fs.num_views("train") == 3 and fs.num_views("test") == 0
    assert fs.views_nbytes("train") == views.size * 2 and fs.views_nbytes("test") == 0
    np.testing.assert_array_equal(fs.views("train"), views)
    vt = fs.views("train", device="cpu", dtype=torch.float32)
    assert vt.dtype == torch.float32 and vt.shape == (3, 50, D)
    np.testing.assert_array_equal(fs.read_views_rows("train", 2, slice(10, 40)), views[2:3, 10:40])
    np.testing.assert_array_equal(fs.read_views_rows("train", [0, 2], [1, 17, 49]), views[[0, 2]][:, [1, 17, 49]])
    np.testing.assert_array_equal(fs.read_views_rows("train", slice(1, 3)), views[1:3])
    assert fs.tta_mode("test") == "five-crop" and fs.tta_mode("train") is None
    np.testing.assert_array_equal(fs.tta_features("test"), tta)
    assert fs.meta["train_views"] == 3 and fs.meta["test_views"] == "five-crop"
    with pytest.raises(UserError, match=r"split 'test' has no train-transform views; re-extract with "
                                        r"`ballad-pipe extract … --train-views 8`"):
        fs.views("test")
    with pytest.raises(UserError, match=r"split 'train' has no test-time views; re-extract with "
                                        r"`ballad-pipe extract … --test-views five-crop`"):
        fs.tta_features("train")
    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="r")
    assert root["train/views"].chunks == (1, chunk_rows(50), D) and root["train"].attrs["views"] == 3
    assert root["test/tta"].shape == (5, 12, D) and root["test"].attrs["tta"] == "five-crop"


def test_split_writer_stages_and_writes_views(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_writer, "CHUNK_ROWS", 5)  # chunks cross shard boundaries
    rng = np.random.default_rng(7)
    counts, v = [6, 0, 7, 9], 3
    staged = [rng.normal(size=(v, n, D)).astype(np.float16) for n in counts]
    stores = {}
    for world in (1, 2):
        group = _create(tmp_path / f"w{world}.zarr")
        writer = SplitWriter(group, "train", len(counts), "float16", extra=features.ExtraViews("views", v, v))
        writer.prepare(is_main=True)
        for s, n in enumerate(counts):
            writer.stage(s, staged[s][0], np.zeros(n), [f"s{s}_{i}" for i in range(n)], [], staged[s])
        with pytest.raises(ValueError, match=r"views is \(2, 6, 8\), expected \(3, 6, 8\)"):
            writer.stage(0, staged[0][0], np.zeros(6), ["k"] * 6, [], staged[0][:2])
        sync = threading.Barrier(world)
        workers = [threading.Thread(target=writer.finish, args=(D, r, world, sync.wait)) for r in range(world)]
        [t.start() for t in workers]
        [t.join() for t in workers]
        stores[world] = FeatureStore.open(tmp_path / f"w{world}.zarr")
        np.testing.assert_array_equal(stores[world].views("train"), np.concatenate(staged, axis=1))
        assert stores[world].split_attrs("train")["views"] == v
    np.testing.assert_array_equal(stores[1].features("train")[0], stores[2].features("train")[0])


def test_create_store_refuses_other_view_settings(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, _attrs())  # written before view settings existed: counts as none
    assert create_store(path, {**_attrs(), "train_views": 0, "test_views": "none"}) is not None
    for key, value in (("train_views", 4), ("test_views", "flip")):
        with pytest.raises(UserError, match=rf"holds a store made with another {key} \((0|none)\).*--overwrite"):
            create_store(path, {**_attrs(), key: value})


def _chunk_file(store, array: str):
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())[-1]


@pytest.mark.parametrize("array, damage", [("train/image", "flip"), ("train/image", "truncate"),
                                           ("train/label", "delete"), ("train/key", "flip"),
                                           ("train/views", "truncate"), ("test/tta", "flip")])
def test_damaged_chunk_is_a_one_line_error_naming_array_and_rebuild(tmp_path, array, damage):
    path = tmp_path / "d.zarr"
    _with_views(path, np.random.default_rng(8))
    z = zarr.open_group(str(path), mode="r+")
    z.attrs["command"] = "ballad-pipe extract --ckpt c.pt --data d --out x"
    chunk = _chunk_file(path, array)
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x08
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[:len(data) // 2]))
    else:
        chunk.unlink()
    fs = FeatureStore.open(path)
    split, name = array.split("/")
    read = {"image": lambda: fs.features(split), "label": lambda: fs.features(split), "key": lambda: fs.keys(split),
            "views": lambda: fs.views(split), "tta": lambda: fs.tta_features(split)}[name]
    with pytest.raises(UserError) as e:
        read()
    message = str(e.value)
    assert "\n" not in message and f"array {array} is damaged" in message
    problem = {"flip": "CRC32C checksum", "truncate": "CRC32C checksum", "delete": "chunk files are missing"}[damage]
    assert problem in message
    assert message.endswith(f"rebuild the store: `rm -r {path} && ballad-pipe extract --ckpt c.pt --data d --out x`")


def _edit_attrs(store, node: str, **attrs):
    """Edit a group's attributes in its zarr.json by hand, as a user or a script would (no checksum covers them)."""
    path = store / node / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"].update(attrs)
    path.write_text(json.dumps(doc))


RENAMED = ["c0", "c1", "c2", "C3"]


@pytest.mark.parametrize("node, attrs, message", [
    ("", {"logit_scale": math.nan}, "{s}: attribute 'logit_scale' is nan; expected a finite number > 0 and ≤ 10000"),
    ("", {"logit_scale": -100}, "{s}: attribute 'logit_scale' is -100; expected a finite number > 0"),
    ("", {"dtype": "float64"}, "{s}: attribute 'dtype' is 'float64'; expected one of float16, float32"),
    ("", {"train_class_counts": [5, 5, 5]}, "{s}: attribute 'train_class_counts' is [5, 5, 5]; expected a list of 4 "
                                            "items (as many as 'classnames')"),
    ("", {"train_class_counts": [5, 5, 5, -1]}, "{s}: attribute 'train_class_counts[3]' is -1; expected a whole number"),
    ("", {"classnames": RENAMED}, "{s}: attribute 'fingerprint.classnames_sha256' is '"),
    ("", {"embed_dim": 7}, "{s}: attribute 'fingerprint.embed_dim' is 8; expected 7 (equal to 'embed_dim')"),
    ("", {"embed_dim": 7, "fingerprint": make_fingerprint("synthetic", None, None, [f"c{i}" for i in range(K)], 7)},
     "{s}/text/embeddings: shape (4, 8), expected shape (4, 7) (4 classnames of embed_dim 7)"),
    ("", {"classnames": ["c0", "c1", "c2"], "train_class_counts": [1, 1, 1],
          "fingerprint": make_fingerprint("synthetic", None, None, ["c0", "c1", "c2"], D)},
     "{s}/text/embeddings: shape (4, 8), expected shape (3, 8) (3 classnames of embed_dim 8)"),
    ("", {"splits": ["train", "val", "test"]}, "{s}: has no group 'val' (listed in attribute 'splits')"),
    ("", {"splits": ["train", "../test"]}, "{s}: attribute 'splits[1]' is '../test'; expected a split name"),
    ("", {"command": "ballad-pipe extract\nrm -rf ~"}, "{s}: attribute 'command' is 'ballad-pipe extract\\nrm -rf ~'"),
    ("text", {"templates": []}, "{s}/text: attribute 'templates' is []; expected a non-empty list"),
    ("train", {"complete": "yes"}, "{s}/train: attribute 'complete' is 'yes'; expected true or false"),
    ("train", {"num_samples": 7}, "{s}/train: image, label and key rows {{'image': 50, 'label': 50, 'key': 50}} "
                                  "disagree with num_samples 7"),
    ("train", {"views": 2}, "{s}/train/views: shape (3, 50, 8), expected shape (2, 50, 8) (views 2, num_samples 50, "
                            "embed_dim 8)"),
    ("test", {"tta": "ten-crop"}, "{s}/test/tta: shape (5, 12, 8), expected shape (10, 12, 8) (tta 'ten-crop', "),
    ("test", {"views": 5}, "{s}/test/views: missing, expected shape (5, 12, 8)"),
], ids=["nan-scale", "negative-scale", "dtype", "counts-short", "negative-count", "renamed-class", "dim",
        "dim-and-fingerprint", "classes", "split-group", "split-path", "command-line-break", "templates", "complete", "num-samples",
        "views", "tta", "views-not-there"])
def test_an_edited_attribute_is_a_one_line_error_naming_the_key(tmp_path, node, attrs, message):
    """zarr.json is plain JSON that no chunk checksum covers: opening the store checks every attribute and
    its agreement with the arrays' shapes, before anything is computed from them (issue 22: an edited
    NaN logit scale made `evaluate` report NaN metrics and exit 0)."""
    path = tmp_path / "s.zarr"
    _with_views(path, np.random.default_rng(8))
    _edit_attrs(path, node, **attrs)
    with pytest.raises(UserError) as e:
        FeatureStore.open(path)
    text = str(e.value)
    assert text.startswith(message.format(s=path)) and "\n" not in text
    assert text.endswith(f"; rebuild the store: `rm -r {path} && ballad-pipe extract … --out {path}`")


def test_extract_does_not_resume_a_store_whose_attributes_were_edited(tmp_path):
    """Resuming reads the old attributes to decide what to keep: edited ones are refused like a clash."""
    path = tmp_path / "s.zarr"
    create_store(path, _attrs())
    _edit_attrs(path, "", fingerprint="m")
    with pytest.raises(UserError, match=r"^--out .*s.zarr: attribute 'fingerprint' is 'm'; expected an object with "
                                        r"'model', .*; choose another --out or pass --overwrite$"):
        create_store(path, _attrs())
    assert create_store(path, _attrs(), overwrite=True).attrs["fingerprint"] == _attrs()["fingerprint"]
