"""Reliability (issue 16): the write lock, disk-full and permission errors, `verify` on good and damaged
inputs of each kind, and `prepare` killed at random moments. docs/reliability.md maps each guarantee
to these tests."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline.errors import UserError
from pipeline.locks import exclusive_lock, lock_path
from pipeline.runtime import sha256_file
from store.shards import load_dataset

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ["prepare", "synthetic", "--max-count", "30", "--imbalance", "10", "--test-per-class", "2",
           "--val-per-class", "1", "--shard-size", "50"]


def one_line_error(result) -> str:
    """The single `Error: …` line of a failed command; fails on a traceback or a longer message."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: outputs compared byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted `prepare` of PREPARE: what every interrupted and resumed run must end as."""
    out = tmp_path_factory.mktemp("ref") / "shapes"
    result = CliRunner().invoke(main, PREPARE + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- pipeline/locks.py
@contextlib.contextmanager
def held_lock(output: Path):
    """Another process holding ``output``'s write lock until the block ends or the test kills it."""
    code = ("import sys, time\nfrom pipeline.locks import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(output)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_saved_checkpoints_are_atomic_and_their_bytes_depend_on_the_weights_only(tmp_path):
    """torch.save given a path names its archive after it: through a temporary name the same weights would
    give another sha256 every run, and DVC would re-run every stage downstream of an unchanged checkpoint."""
    from pipeline.runtime import save_torch

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    save_torch(weights, tmp_path / "a.pt")
    save_torch(weights, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temporary file left behind
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], weights["w"])


def test_lock_file_sits_beside_the_output_and_names_its_holder(tmp_path):
    out = tmp_path / "data"
    assert lock_path(out) == tmp_path / ".data.lock"
    with exclusive_lock(out) as path:
        assert path == lock_path(out) and path.read_text() == str(os.getpid())
    assert not out.exists()  # DVC caches output directories whole: the lock is never inside one


def test_second_writer_is_refused_naming_the_path_and_the_holder_pid(tmp_path):
    out = tmp_path / "data"
    with held_lock(out) as holder:
        with pytest.raises(UserError) as e:
            with exclusive_lock(out):
                pass
    assert str(e.value) == (f"--out {out}: process {holder.pid} is writing it (lock {lock_path(out)}); wait for it "
                            "to finish or choose another output")


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    out = tmp_path / "data"
    with held_lock(out) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with exclusive_lock(out) as path:  # the kernel released the flock; the file with the old PID stays
            assert path.read_text() == str(os.getpid())


# A holder of OUT's lock that starts a child HOW (fork, a fork multiprocessing.Process, or subprocess) and
# waits. The child prints its PID and how many descriptors of the lock file it holds, then sleeps.
FORKING_HOLDER = """\
import multiprocessing, os, subprocess, sys, time
from pipeline.locks import exclusive_lock, lock_path

def child(out):
    lock = os.path.realpath(lock_path(out))
    copies = sum(os.path.realpath(f"/proc/self/fd/{fd}") == lock for fd in os.listdir("/proc/self/fd"))
    print(os.getpid(), copies, flush=True)
    time.sleep(600)
    os._exit(0)

out, how = sys.argv[1], sys.argv[2]
if how == "child":
    child(out)
with exclusive_lock(out):
    if how == "fork":
        if os.fork() == 0:
            child(out)
    elif how == "multiprocessing":
        multiprocessing.get_context("fork").Process(target=child, args=(out,)).start()
    else:
        subprocess.Popen([sys.executable, __file__, out, "child"], close_fds=False)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    """``pid`` runs (not a zombie); an orphan's zombie is reaped by init, a child's by our wait."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def forking_holder(out: Path, how: str, tmp_path: Path):
    """(the holder process, its child's PID, the child's descriptors of the lock); both killed at the end."""
    script = tmp_path / "holder.py"
    script.write_text(FORKING_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(out), how], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = None
    try:
        child, copies = map(int, proc.stdout.readline().split())
        yield proc, child, copies
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("how", ["fork", "multiprocessing", "subprocess"])
def test_the_lock_of_a_killed_holder_is_free_while_its_children_live(tmp_path, how):
    """Issue 22: DataLoader workers, forked while the lock is held, kept it for seconds after a SIGKILL of
    their parent. subprocess never inherited it (PEP 446); it stays here as a guard."""
    out = tmp_path / "data"
    with forking_holder(out, how, tmp_path) as (holder, child, _):
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with exclusive_lock(out) as path:
            assert path.read_text() == str(os.getpid())
        assert alive(child)


@pytest.mark.parametrize("how", ["fork", "multiprocessing", "subprocess"])
def test_a_child_holds_no_copy_of_the_lock_and_the_holder_keeps_it(tmp_path, how):
    """The child closed its copy (a fork's is closed at once); closing a copy leaves the holder's flock held."""
    out = tmp_path / "data"
    with forking_holder(out, how, tmp_path) as (holder, child, copies):
        assert copies == 0
        with pytest.raises(UserError, match=f"process {holder.pid} is writing it"):
            with exclusive_lock(out):
                pass
        assert alive(child)


def test_a_lock_descriptor_is_not_inheritable(tmp_path):
    """What keeps subprocess's and the spawn and forkserver start methods' children (they exec) off the lock."""
    with exclusive_lock(tmp_path / "data") as path:
        [fd] = [int(fd) for fd in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)]
        assert not os.get_inheritable(fd)


def _children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s child processes (read from /proc, as no library here lists them)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_extract_killed_while_its_loader_workers_run_resumes_at_once(tiny_data, tmp_path):
    """Issue 22, end to end: SIGKILL an `extract --workers 2` while its loader workers read shards; the
    workers live on until they notice (seconds), and the resume started at once must get the lock."""
    from store.features import FeatureStore

    store = tmp_path / "features.zarr"
    args = ["extract", "--ckpt", "none", "--model", "ballad-tiny", "--data", str(tiny_data), "--out", str(store),
            "--workers", "2", "--batch-size", "8", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "BALLAD_PROGRESS": "0"})
    workers = []
    try:
        deadline = time.monotonic() + 300
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            workers = _children(proc.pid)
        assert len(workers) == 2, "extract ended (or hung) before its loader workers were seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with exclusive_lock(store):  # the resume's first step
            assert any(alive(w) for w in workers), "the workers exited before the lock was tried: nothing tested"
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        opened = FeatureStore.open(store)
        assert {s: opened.num_samples(s) for s in ("train", "val", "test")} == {
            s: load_dataset(tiny_data).split(s).num_samples for s in ("train", "val", "test")}
    finally:
        proc.kill()
        proc.wait()
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)


def test_the_lock_is_released_when_the_block_ends_or_raises(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(ValueError):
        with exclusive_lock(out):
            raise ValueError("a failing writer")
    with exclusive_lock(out):
        with pytest.raises(UserError, match=f"process {os.getpid()} is writing it"):
            with exclusive_lock(out):  # a second open file description conflicts, even in the same process
                pass
    with exclusive_lock(out):
        pass


def test_a_lock_file_that_cannot_be_created_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "data"
    with pytest.raises(UserError, match=rf"^--out {out}: cannot create the lock file .*\.data\.lock \(.+\)$"):
        with exclusive_lock(out):
            pass


def test_readers_never_wait_for_the_writer(reference):
    with held_lock(reference):
        assert load_dataset(reference).urls("train") == [str(p) for p in sorted((reference / "train").glob("*.tar"))]
        result = CliRunner().invoke(main, ["verify", str(reference)])
        assert result.exit_code == 0, result.output


def test_concurrent_prepare_is_refused_and_runs_once_the_holder_is_killed(reference, tmp_path):
    out = tmp_path / "shapes"
    with held_lock(out) as holder:
        line = one_line_error(CliRunner().invoke(main, PREPARE + ["--out", str(out)]))
        assert line.startswith(f"Error: --out {out}: process {holder.pid} is writing it (lock {lock_path(out)})")
        assert not out.exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        result = CliRunner().invoke(main, PREPARE + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    assert tree(out) == tree(reference)


# ---------------------------------------------------------------- disk full, permissions, read-only file systems
@pytest.mark.parametrize("code, what", [
    (errno.ENOSPC, "no space left on device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EACCES, "permission denied"),
    (errno.EPERM, "operation not permitted"),
    (errno.EROFS, "read-only file system"),
])
def test_write_error_mid_shard_is_one_line_naming_the_shard_and_the_rerun_resumes(reference, tmp_path, monkeypatch,
                                                                                   code, what):
    import stages.prepare.writer

    real, calls = stages.prepare.writer.write_shard, []

    def failing(path, samples):
        """The third shard fails after two samples, as write() does: an OSError that names no file."""
        def cut():
            for i, sample in enumerate(samples):
                if i == 2:
                    raise OSError(code, os.strerror(code))
                yield sample

        calls.append(path)
        return real(path, cut() if len(calls) == 3 else samples)

    monkeypatch.setattr(stages.prepare.writer, "write_shard", failing)
    out = tmp_path / "shapes"
    line = one_line_error(CliRunner().invoke(main, PREPARE + ["--out", str(out)]))
    assert line.startswith(f"Error: {out / 'train' / 'shard-000002.tar'}: {what}; ")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]  # no .tmp
    with pytest.raises(UserError, match="unfinished prepare"):
        load_dataset(out)
    monkeypatch.undo()
    result = CliRunner().invoke(main, PREPARE + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    assert tree(out) == tree(reference)


def test_disk_full_writing_dataset_json_names_it_and_the_rerun_resumes(reference, tmp_path, monkeypatch):
    import stages.prepare.writer

    real = stages.prepare.writer.write_json

    def full_disk(path, obj):
        if Path(path).name == "dataset.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(stages.prepare.writer, "write_json", full_disk)
    out = tmp_path / "shapes"
    line = one_line_error(CliRunner().invoke(main, PREPARE + ["--out", str(out)]))
    assert line == (f"Error: {out / 'dataset.json'}: no space left on device; free some space and re-run the "
                    "command (prepare and extract resume, phase-a with --resume)")
    monkeypatch.undo()
    assert CliRunner().invoke(main, PREPARE + ["--out", str(out)]).exit_code == 0
    assert tree(out) == tree(reference)


def test_other_os_errors_are_bugs_and_keep_their_traceback(tmp_path, monkeypatch):
    import stages.prepare.writer

    def broken(path, obj):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(stages.prepare.writer, "write_json", broken)
    result = CliRunner().invoke(main, PREPARE + ["--out", str(tmp_path / "shapes")])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO


# ---------------------------------------------------------------- verify
def run_verify(path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.strip().splitlines()


def assert_all_ok(path, kind: str) -> list[str]:
    code, lines = run_verify(path)
    assert code == 0 and lines[0] == f"{path}: {kind}", lines
    assert all(line.startswith("ok ") for line in lines[1:]), lines
    return lines


def failures(path, count: int) -> list[str]:
    """The FAIL lines of a verify run that must find ``count`` problems (and say so, exiting non-zero)."""
    code, lines = run_verify(path)
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert code != 0 and len(fails) == count and lines[-1] == f"Error: {path}: {count} check(s) failed", lines
    return fails


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_dataset(reference, tmp_path):
    lines = assert_all_ok(reference, "dataset")
    assert [line.split(":")[0] for line in lines[2:]] == [f"ok {reference / s}" for s in ("train", "val", "test")]

    data = tmp_path / "data"
    shutil.copytree(reference, data)
    flip_byte(data / "train" / "shard-000000.tar", 1200)
    (data / "val" / "shard-000000.tar").unlink()
    (data / "test" / "shard-000000.tar").write_bytes((reference / "test" / "shard-000000.tar").read_bytes()[:5000])
    rebuild = f"rebuild it with `{load_dataset(data).command} --out {data}`"
    assert failures(data, 3) == [
        f"FAIL {data / 'train' / 'shard-000000.tar'}: damaged shard (its sha256 differs from dataset.json's); {rebuild}",
        f"FAIL {data / 'val' / 'shard-000000.tar'}: shard listed in dataset.json is missing; {rebuild}",
        f"FAIL {data / 'test' / 'shard-000000.tar'}: truncated or damaged shard (5000 bytes, dataset.json records "
        f"{(reference / 'test' / 'shard-000000.tar').stat().st_size}); {rebuild}"]


def test_verify_dataset_whose_counts_disagree_with_its_shards(reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(reference, data)
    meta = json.loads((data / "dataset.json").read_text())
    counts = meta["splits"]["val"]["class_counts"]
    counts[0], counts[1] = counts[0] + 1, counts[1] - 1
    (data / "dataset.json").write_text(json.dumps(meta))
    [line] = failures(data, 1)
    assert f"{data / 'dataset.json'}: split 'val' lists 2 samples of class 0" in line and "but its shards hold 1" in line


def test_verify_unfinished_dataset(reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(reference, data)
    (data / "dataset.json").unlink()
    [line] = failures(data, 1)
    assert "(an unfinished prepare: re-run it)" in line


@pytest.fixture
def store_copy(lt_store, tmp_path):
    path = tmp_path / "lt.zarr"
    shutil.copytree(lt_store, path)
    return path


def _set_attr(path, node, **attrs):
    import zarr

    zarr.open_group(str(path), mode="r+")[node].attrs.update(attrs)


def _write_nan(path):
    import zarr

    array = zarr.open_array(str(path / "test" / "image"), mode="r+")
    array[3, 2] = np.nan  # written through zarr: its checksum is valid, the value is not


@pytest.mark.parametrize("damage, bad, problem", [
    (lambda p: flip_byte(p / "train" / "image" / "c" / "0" / "0", 100), "train/image", "a chunk fails its CRC32C checksum"),
    (lambda p: os.truncate(p / "test" / "label" / "c" / "0", 40), "test/label", "a chunk"),
    (lambda p: (p / "train" / "key" / "c" / "0").unlink(), "train/key", "1 of its 1 chunk files are missing"),
    (_write_nan, "test/image", "1 non-finite values"),
], ids=["flipped-bit", "truncated-chunk", "missing-chunk", "nan"])
def test_verify_store_reads_every_array(store_copy, damage, bad, problem):
    assert_all_ok(store_copy, "feature store")
    damage(store_copy)
    [line] = failures(store_copy, 1)
    assert line.startswith(f"FAIL {store_copy / bad}: {problem}") and "; rebuild the store: `" in line


@pytest.mark.parametrize("attrs, problem", [
    ({"complete": False}, "{store}: split 'train' is incomplete"),
    ({"num_samples": 7}, "{store}/train: image, label and key rows {{'image': {n}, 'label': {n}, 'key': {n}}} "
                         "disagree with num_samples 7"),
], ids=["incomplete", "row-count"])
def test_verify_store_split_records(store_copy, attrs, problem):
    from store.features import FeatureStore

    n = FeatureStore.open(store_copy).num_samples("train")
    _set_attr(store_copy, "train", **attrs)
    [line] = failures(store_copy, 1)
    assert line.startswith("FAIL " + problem.format(store=store_copy, n=n))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tiny_backbone):
    """A finished Phase A output directory as stages.phase_a writes it: final.pt, final.json, last.pt."""
    out = tmp_path_factory.mktemp("phase_a")
    state = tiny_backbone.model.state_dict()
    torch.save(state, out / "final.pt")
    (out / "final.json").write_text(json.dumps({"model": "ballad-tiny", "pretrained": None, "checkpoint": "final.pt",
                                                "sha256": sha256_file(out / "final.pt"), "steps": 7}))
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "step": 7},
               out / "last.pt")
    return out


class Evil:
    """Pickled code: unpickling it with full pickle loading would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _load_as_checkpoint(path: Path, store: Path):
    from pipeline.models import create_model

    create_model("ballad-tiny", pretrained=str(path))


def _load_as_adapter(path: Path, store: Path):
    from stages.adapter import load_adapter
    from store.features import FeatureStore

    load_adapter(path, FeatureStore.open(store), store)


@pytest.mark.parametrize("load, message", [
    (_load_as_checkpoint, r"evil.pt: not a readable state-dict checkpoint \(UnpicklingError\)"),
    (_load_as_adapter, r"--adapter .*evil.pt: not a readable adapter file \(UnpicklingError\)"),
], ids=["checkpoint", "adapter"])
def test_pickled_code_in_a_checkpoint_or_adapter_is_refused_and_never_run(lt_store, tmp_path, load, message):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save(Evil(marker), evil)
    with pytest.raises(UserError, match=message):
        load(evil, lt_store)
    assert not marker.exists()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _replace_final(ckpt: Path, obj=None, raw: bytes | None = None) -> None:
    """A new final.pt with final.json's sha256 updated: only loading can tell it is wrong."""
    if raw is not None:
        (ckpt / "final.pt").write_bytes(raw)
    else:
        torch.save(obj, ckpt / "final.pt")
    meta = json.loads((ckpt / "final.json").read_text())
    meta["sha256"] = sha256_file(ckpt / "final.pt")
    (ckpt / "final.json").write_text(json.dumps(meta))


def _edit_final(ckpt: Path, **keys) -> None:
    """final.json edited by hand; a key set to None is removed."""
    meta = {**json.loads((ckpt / "final.json").read_text()), **keys}
    (ckpt / "final.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


@pytest.mark.parametrize("damage, problem", [
    (lambda c: _truncate(c / "final.pt"), "final.pt: damaged or replaced (its sha256 differs from final.json's)"),
    (lambda c: (c / "final.json").unlink(), "final.json: missing or malformed (FileNotFoundError)"),
    (lambda c: _replace_final(c, {"visual.conv1.weight": torch.zeros(1)}), "does not match architecture ballad-tiny"),
    (lambda c: _replace_final(c, raw=pickle.dumps(Evil(c / "ran"))), "final.pt: not a readable state-dict checkpoint"),
    (lambda c: _truncate(c / "last.pt"), "last.pt: unreadable resume state"),
    (lambda c: ((c / "final.pt").unlink(), (c / "final.json").unlink()), "no final.pt, an unfinished run"),
    (lambda c: _edit_final(c, steps=-7), "final.json: key 'steps' is -7; expected a whole number ≥ 0; retrain"),
    (lambda c: _edit_final(c, sha256=None), "final.json: key 'sha256' is missing; expected a sha256"),
    (lambda c: _edit_final(c, model=["ballad-tiny"]), "final.json: key 'model' is ['ballad-tiny']; expected a non-empty"),
], ids=["truncated-final", "no-final-json", "other-architecture", "pickle", "truncated-last", "unfinished",
        "edited-steps", "no-sha256", "edited-model"])
def test_verify_checkpoint_directory(ckpt_dir, tmp_path, damage, problem):
    lines = assert_all_ok(ckpt_dir, "Phase A checkpoint directory")
    assert lines[1].endswith(" tensors load weights-only into ballad-tiny") and lines[2].endswith("at step 7 loads weights-only")
    ckpt = tmp_path / "phase_a"
    shutil.copytree(ckpt_dir, ckpt)
    damage(ckpt)
    [line] = failures(ckpt, 1)
    assert problem in line and not (ckpt / "ran").exists()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ckpt_dir, tiny_data):
    """An exported bundle (no adapter) of ckpt_dir's model, over a store of tiny_data's val split."""
    from stages.bundle.run import export
    from stages.extract.run import extract

    root = tmp_path_factory.mktemp("bundle")
    extract(str(ckpt_dir / "final.pt"), tiny_data, root / "features.zarr", splits=["val"], batch_size=64, workers=0)
    export(ckpt_dir / "final.pt", "none", root / "features.zarr", root / "shapes.bundle")
    return root / "shapes.bundle"


@pytest.mark.parametrize("damage, problem", [
    (lambda b: flip_byte(b / "head.safetensors", 200), "head.safetensors: damaged or replaced (its sha256 differs"),
    (lambda b: (b / "model.safetensors").unlink(), "model.safetensors: missing from the bundle"),
    (lambda b: (b / "bundle.json").write_text("{"), "bundle.json: malformed (JSONDecodeError)"),
], ids=["flipped-bit", "missing-file", "malformed-json"])
def test_verify_bundle(bundle, tmp_path, damage, problem):
    assert assert_all_ok(bundle, "bundle")[-1] == f"ok {bundle}: loads and predicts 30 classes"
    copy = tmp_path / "b.bundle"
    shutil.copytree(bundle, copy)
    damage(copy)
    [line] = failures(copy, 1)
    assert problem in line


@pytest.mark.parametrize("name, error, rest", [
    ("nope", "{path}: no such file or directory", ""),
    ("", "{path}: not a dataset directory, feature store, Phase A checkpoint directory or bundle", ".*"),
], ids=["missing", "unknown-kind"])
def test_verify_refuses_what_it_cannot_check(tmp_path, name, error, rest):
    path = tmp_path / name
    line = one_line_error(CliRunner().invoke(main, ["verify", str(path)]))
    assert re.fullmatch(re.escape("Error: " + error.format(path=path)) + rest, line), line


# ---------------------------------------------------------------- fault injection
@pytest.mark.slow
def test_prepare_killed_at_random_moments_resumes_to_the_uninterrupted_output(tmp_path):
    """SIGKILL at seeded random moments of a run, then a rerun: shards and dataset.json byte for byte as an
    uninterrupted run's. bench/faults.py runs many more trials, and extract and adapter too."""
    args = [sys.executable, "-m", "cli", *PREPARE]
    env = {**os.environ, "BALLAD_PROGRESS": "0"}
    started = time.monotonic()
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True, cwd=ROOT, env=env)
    duration = time.monotonic() - started  # kills land anywhere from start-up to the last write
    rng = random.Random(16)
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(args + ["--out", str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0, duration))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        subprocess.run(args + ["--out", str(out)], check=True, capture_output=True, cwd=ROOT, env=env)
        assert tree(out) == tree(tmp_path / "ref"), f"trial {trial}"
