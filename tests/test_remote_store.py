"""The feature store at a URL: `extract --out` on object storage (an S3 server, moto's, on 127.0.0.1; and
fsspec's memory://), read back by `adapter`, `evaluate`, `sweep` and `neighbors`, and from a local store served
over HTTP; resume and checksums on object storage; the lock object beside a store at a URL."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid

import fsspec
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import store.feature_writer as feature_writer
import store.features as features
from cli import main
from pipeline.errors import UserError
from stages.extract.run import extract
from stages.prepare.synthetic import SyntheticConfig, prepare_synthetic
from store.features import FeatureStore
from store.feature_writer import write_store
from store.location import object_lock_url, write_lock

pytestmark = pytest.mark.usefixtures("single_thread")
EXTRACT = ["--ckpt", "none", "--model", "ballad-tiny", "--batch-size", "32", "--workers", "0", "--device", "cpu"]
ADAPTER = ["--epochs", "2", "--batch-size", "32", "--device", "cpu"]


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def _ok(*args) -> str:
    code, output = _cli(*args)
    assert code == 0, output
    return output


def _fails(match: str, *args) -> None:
    """The CLI refuses with one line naming the problem, no traceback."""
    code, output = _cli(*args)
    assert code != 0 and len(output.splitlines()) == 1 and re.search(match, output), output


def _arrays(where) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(where), mode="r")
    return {name: node[:] for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def _same_arrays(a, b) -> None:
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small dataset: 3 train shards, 1 val and 1 test shard."""
    return prepare_synthetic(SyntheticConfig(out=str(tmp_path_factory.mktemp("data") / "ds"), max_count=12, imbalance=4,
                                             test_per_class=1, val_per_class=1, shard_size=64))


@pytest.fixture(scope="module")
def local(data, tmp_path_factory):
    """The reference: the same extract into a local directory."""
    out = tmp_path_factory.mktemp("local") / "f.zarr"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _ok("extract", *EXTRACT, "--data", data, "--out", out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture
def memory():
    """A fresh memory:// prefix, emptied afterwards."""
    url = f"memory://t{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _phase_b(features_url, tmp_path, name: str) -> tuple:
    """adapter, evaluate, sweep and neighbors on a store: (the adapter file, metrics.json, sweep.json,
    neighbors' output)."""
    model, report = tmp_path / f"{name}.pt", tmp_path / name
    _ok("adapter", "--features", features_url, *ADAPTER, "--out", model)
    _ok("evaluate", "--features", features_url, "--adapter", model, "--device", "cpu", "--out", report / "eval")
    _ok("sweep", "--features", features_url, "--lambdas", "0.5", *ADAPTER, "--out", report / "sweep")
    key = FeatureStore.open(features_url).keys("test")[0]
    near = _ok("neighbors", "--features", features_url, "--key", key, "--adapter", model, "--device", "cpu")
    return (torch.load(model, weights_only=True), json.loads((report / "eval" / "metrics.json").read_text()),
            json.loads((report / "sweep" / "sweep.json").read_text()), near)


@pytest.fixture(scope="module")
def local_phase_b(local, tmp_path_factory):
    """``_phase_b`` on the local reference store."""
    return _phase_b(local, tmp_path_factory.mktemp("local_phase_b"), "local")


def _same_phase_b(a, b) -> None:
    assert a[0]["losses"] == b[0]["losses"] and a[0]["fingerprint"] == b[0]["fingerprint"]
    for k in a[0]["state_dict"]:
        torch.testing.assert_close(a[0]["state_dict"][k], b[0]["state_dict"][k], rtol=0, atol=0)
    assert a[1:] == b[1:]


# ---------------------------------------------------------------- memory://
def test_extract_to_a_url_writes_the_local_store_and_phase_b_reads_it(data, local, local_phase_b, memory, tmp_path):
    url = f"{memory}/features/f.zarr"
    _ok("extract", *EXTRACT, "--data", data, "--out", url)
    _same_arrays(local, url)
    fs = fsspec.filesystem("memory")
    assert not fs.exists(f"{url}/{features.STAGING}")  # staged shards removed once every split is complete
    assert not fs.exists(object_lock_url(url))  # the lock object is gone with its holder
    store = FeatureStore.open(url)
    assert store.path == url and store.splits == ["train", "val", "test"]
    _same_phase_b(_phase_b(url, tmp_path, "url"), local_phase_b)


def test_an_interrupted_extract_to_a_url_resumes_from_the_staged_shards(data, local, memory, monkeypatch, caplog):
    url = f"{memory}/f.zarr"
    stage, staged = feature_writer.SplitWriter.stage, []

    def stage_then_stop(self, shard, *args, **kw):  # as a kill after the second train shard
        stage(self, shard, *args, **kw)
        staged.append(shard)
        if len(staged) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(feature_writer.SplitWriter, "stage", stage_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract(None, data, url, model="ballad-tiny", batch_size=32, workers=0, device="cpu")
    fs = fsspec.filesystem("memory")
    assert sorted(fs.ls(f"{url}/{features.STAGING}/train", detail=False)) == [
        f"/{url[len('memory://'):]}/{features.STAGING}/train/{s:06d}.npz" for s in (0, 1)]
    with pytest.raises(UserError, match=r"split 'train' is incomplete.*`ballad-pipe extract .*--splits train` "):
        FeatureStore.open(url).features("train")
    monkeypatch.setattr(feature_writer.SplitWriter, "stage", stage)
    with caplog.at_level("INFO", logger="ballad.extract"):
        done = extract(None, data, url, model="ballad-tiny", batch_size=32, workers=0, device="cpu")
    assert "train: 2 of 3 shard(s) already extracted, computing 1" in caplog.text
    assert done == {"train": 1, "val": 1, "test": 1}
    _same_arrays(local, url)


def test_damage_on_object_storage_is_named_with_the_rebuild(memory):
    url = f"{memory}/s.zarr"
    rng = np.random.default_rng(0)
    write_store(url, image={"train": rng.normal(size=(6, 4))}, labels={"train": np.arange(6) % 2}, keys=None,
                text_embeddings=rng.normal(size=(2, 4)), classnames=["a", "b"], logit_scale=100.0,
                train_class_counts=[3, 3], meta={"command": f"ballad-pipe extract --out {url}"})
    fs = fsspec.filesystem("memory")
    chunk = f"{url}/train/image/c/0/0"
    blob = bytearray(fs.cat_file(chunk))
    blob[3] ^= 0x10
    fs.pipe_file(chunk, bytes(blob))
    rebuild = re.escape(f"rebuild the store: `python -c '{features.REMOVE_URL}' {url} && ballad-pipe extract "
                        f"--out {url}`")
    with pytest.raises(UserError, match=rf"^{url}: array train/image is damaged \(a chunk fails its CRC32C checksum\); "
                                        rf"{rebuild}$"):
        FeatureStore.open(url).features("train")
    fs.rm_file(chunk)
    with pytest.raises(UserError, match=r"train/image is damaged \(1 of its 1 chunk files are missing\)"):
        FeatureStore.open(url).features("train")


# ---------------------------------------------------------------- the lock object
def test_a_store_at_a_url_has_one_writer_through_a_lock_object(memory):
    url = f"{memory}/features/f.zarr"
    lock = f"{memory}/features/.f.zarr.lock"
    fs = fsspec.filesystem("memory")
    with write_lock(url) as held:
        assert held == lock and json.loads(fs.cat_file(lock))["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"^--out {url}: process {os.getpid()} on .* \(since .*\) is writing it "
                                            rf"\(lock {lock}\); wait for it to finish, or, if that process is gone"):
            with write_lock(url):
                pass
    assert not fs.exists(lock)
    with pytest.raises(RuntimeError), write_lock(url):  # released when the block raises, too
        raise RuntimeError
    assert not fs.exists(lock)
    fs.pipe_file(lock, b"{}")  # what a killed holder leaves: refused until it is deleted
    with pytest.raises(UserError, match=rf"another process is writing it .* delete {lock} and re-run$"):
        with write_lock(url):
            pass
    fs.rm_file(lock)
    with write_lock(url):
        pass


def test_outputs_that_cannot_be_locked_or_written_are_refused(data, tmp_path):
    with write_lock(f"file://{tmp_path}/x.zarr") as held:  # file:// is a local path: flock beside it
        assert held == tmp_path / ".x.zarr.lock"
    _fails(r"^Error: --out http://127.0.0.1:9/f.zarr: http\(s\) is read-only; write to a local path or to s3://",
           "extract", *EXTRACT, "--data", data, "--out", "http://127.0.0.1:9/f.zarr")
    _fails(r"^Error: --out ftp://127.0.0.1:9/f.zarr: ftp:// storage cannot create an object only if it is absent",
           "extract", *EXTRACT, "--data", data, "--out", "ftp://127.0.0.1:9/f.zarr")
    _fails(r"^Error: --features nosuch://x/f.zarr: not a path or a URL fsspec can open",
           "evaluate", "--features", "nosuch://x/f.zarr", "--out", tmp_path / "r")
    _fails(r"^Error: memory://absent/f.zarr: no such feature store", "adapter", "--features", "memory://absent/f.zarr",
           "--out", tmp_path / "a.pt")
    assert not (tmp_path / "r").exists() and not (tmp_path / "a.pt").exists()


# ---------------------------------------------------------------- an S3 server on 127.0.0.1
@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (port 0) with dummy credentials; yields a bucket's URL."""
    from moto.server import ThreadedMotoServer

    quiet = logging.getLogger("werkzeug")  # the server logs a line per request
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    env = pytest.MonkeyPatch()
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                       "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "NO_PROXY": "127.0.0.1,localhost",
                       "no_proxy": "127.0.0.1,localhost"}.items():
        env.setenv(var, value)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")  # read by botocore, under s3fs
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bucket")
    yield "s3://bucket"
    moto.stop()
    env.undo()
    quiet.setLevel(level)


@pytest.mark.slow
def test_extract_to_s3_and_phase_b_from_s3(s3, data, local, local_phase_b, tmp_path):
    url = f"{s3}/features/f.zarr"
    _ok("extract", *EXTRACT, "--data", data, "--out", url)
    _same_arrays(local, url)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists(object_lock_url(url)) and not fs.exists(f"{url}/{features.STAGING}")
    _same_phase_b(_phase_b(url, tmp_path, "s3"), local_phase_b)
    with write_lock(url):  # If-None-Match: the server refuses a second lock object
        _fails(rf"^Error: --out {url}: process {os.getpid()} on .* is writing it \(lock {s3}/features/.f.zarr.lock\)",
               "extract", *EXTRACT, "--data", data, "--out", url)
    _fails(r"^Error: --out s3://nobucket/f.zarr: cannot create the lock s3://nobucket/.f.zarr.lock "
           r"\(FileNotFoundError: The specified bucket does not exist\)",
           "extract", *EXTRACT, "--data", data, "--out", "s3://nobucket/f.zarr")


# ---------------------------------------------------------------- a local store served over HTTP
def test_phase_b_reads_a_store_served_over_http(server, local, local_phase_b, tmp_path):  # noqa: F811
    www, base = server
    shutil.copytree(local, www / "f.zarr")
    _same_phase_b(_phase_b(f"{base}/f.zarr", tmp_path, "http"), local_phase_b)
    _fails(rf"^Error: {base}/absent.zarr: no such feature store", "evaluate", "--features", f"{base}/absent.zarr",
           "--out", tmp_path / "r")
