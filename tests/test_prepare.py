"""prepare: shards round-trip, the synthetic profile, CIFAR-100-LT counts, list parsing, bad input, resume."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.errors import UserError
from pipeline.runtime import sha256_file
from stages.prepare.cifar import CifarConfig, cifar_lt_counts, prepare_cifar100_lt
from stages.prepare.lists import ListConfig, prepare_lists
from stages.prepare.synthetic import SyntheticConfig, prepare_synthetic
from store.shards import load_dataset, read_shard, verify_shards


def _all_samples(root: Path, split: str):
    info = load_dataset(root)
    return [s for url in info.urls(split) for s in read_shard(url)]


@pytest.mark.slow  # renders the whole default demo set (2,911 images)
def test_synthetic_profile_has_many_medium_few(tmp_path):
    info = load_dataset(prepare_synthetic(SyntheticConfig(out=tmp_path / "d", shard_size=500)))
    counts = np.array(info.split("train").class_counts)
    assert (counts > 100).any() and ((counts >= 20) & (counts <= 100)).any() and (counts < 20).any()
    assert counts.max() / counts.min() == pytest.approx(100, rel=0.01)
    assert info.split("test").class_counts == [20] * info.num_classes
    assert info.split("val").class_counts == [10] * info.num_classes
    assert "red triangle" in info.classnames and info.template == "a photo of a {}."


def test_synthetic_is_deterministic_per_seed(tmp_path):
    kw = dict(max_count=30, imbalance=10, test_per_class=2, val_per_class=1, shard_size=64)
    a, b, c = (prepare_synthetic(SyntheticConfig(out=tmp_path / n, seed=s, **kw)) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    shards = sorted(p.relative_to(a) for p in a.rglob("*.tar"))
    assert shards and all((a / s).read_bytes() == (b / s).read_bytes() for s in shards)
    assert (a / "train/shard-000000.tar").read_bytes() != (c / "train/shard-000000.tar").read_bytes()


def test_round_trip_counts_and_labels(tiny_data):
    info = load_dataset(tiny_data)
    for split in ("train", "val", "test"):
        samples = _all_samples(tiny_data, split)
        assert len(samples) == info.split(split).num_samples
        counts = np.bincount([s.label for s in samples], minlength=info.num_classes)
        assert counts.tolist() == info.split(split).class_counts
        assert len({s.key for s in samples}) == len(samples)
        img = Image.open(io.BytesIO(samples[0].image))
        assert img.size == (32, 32) and samples[0].ext == "png"


def _make_images(root: Path, names_labels, fmt="JPEG"):
    for rel, label in names_labels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), label * 40, np.uint8)).save(p, format=fmt)


def _write_list(path: Path, rows):
    path.write_text("".join(f"{rel} {lab}\n" for rel, lab in rows))
    return path


@pytest.fixture
def places_like(tmp_path):
    root = tmp_path / "images"
    train = [(f"train/air_field/{i:08d}.jpg", 0) for i in range(3)] + [(f"train/bakery/{i:08d}.jpg", 1) for i in range(2)]
    test = [("val/a.jpg", 0), ("val/b.jpg", 1)]
    _make_images(root, train + test)
    return root, _write_list(tmp_path / "Places_LT_train.txt", train), _write_list(tmp_path / "Places_LT_test.txt", test)


def test_list_round_trip_is_byte_identical(places_like, tmp_path):
    root, train, test = places_like
    out = prepare_lists(ListConfig(out=tmp_path / "out", root=root, train_list=train, test_list=test))
    info = load_dataset(out)
    assert info.classnames == ["air field", "bakery"] and info.name == "Places"
    samples = sorted(_all_samples(out, "train"), key=lambda s: s.key)
    assert [s.label for s in samples] == [0, 0, 0, 1, 1]
    assert samples[0].key == "train/air_field/00000000" and samples[0].ext == "jpg"
    assert samples[0].image == (root / "train/air_field/00000000.jpg").read_bytes()  # copied, not re-encoded
    test = _all_samples(out, "test")
    assert [s.key for s in test] == ["val/a", "val/b"]  # evaluation splits keep the list's order


def test_list_classes_file_and_imagenet_names(places_like, tmp_path):
    root, train, test = places_like
    classes = tmp_path / "classes.txt"
    classes.write_text("airfield\nbakery shop\n")
    assert load_dataset(prepare_lists(ListConfig(out=tmp_path / "a", root=root, train_list=train, test_list=test, classes=str(classes)))).classnames[1] == "bakery shop"
    names = load_dataset(prepare_lists(ListConfig(out=tmp_path / "b", root=root, train_list=train, test_list=test, classes="imagenet"))).classnames
    assert len(names) == 1000 and names[0] == "tench"


@pytest.mark.parametrize("line, message", [
    ("train/x.jpg notanint", "is not an integer"),
    ("train/x.jpg", "expected '<relative/path> <label>'"),
    ("train/x.jpg -1", "is negative"),
])
def test_list_bad_lines_name_file_and_line(places_like, tmp_path, line, message):
    root, train, test = places_like
    bad = tmp_path / "bad.txt"
    bad.write_text("train/air_field/00000000.jpg 0\n" + line + "\n")
    with pytest.raises(UserError, match=rf"bad.txt:2: .*{message}"):
        prepare_lists(ListConfig(out=tmp_path / "o", root=root, train_list=bad, test_list=test))


def test_list_bad_inputs(places_like, tmp_path):
    root, train, test = places_like
    with pytest.raises(UserError, match="image root directory not found"):
        prepare_lists(ListConfig(out=tmp_path / "o", root=tmp_path / "nope", train_list=train, test_list=test))
    with pytest.raises(UserError, match="list file not found"):
        prepare_lists(ListConfig(out=tmp_path / "o", root=root, train_list=tmp_path / "missing.txt", test_list=test))
    short = tmp_path / "short.txt"
    short.write_text("airfield\n")
    with pytest.raises(UserError, match="1 names but .* uses label 1"):
        prepare_lists(ListConfig(out=tmp_path / "o", root=root, train_list=train, test_list=test, classes=str(short)))
    empty = _write_list(tmp_path / "empty.txt", [])
    with pytest.raises(UserError, match="empty.txt: list is empty"):
        prepare_lists(ListConfig(out=tmp_path / "o", root=root, train_list=train, test_list=empty))
    missing = _write_list(tmp_path / "m.txt", [("val/zzz.jpg", 0)])
    with pytest.raises(UserError, match="image 'val/zzz.jpg' not found"):
        prepare_lists(ListConfig(out=tmp_path / "o", root=root, train_list=train, test_list=missing))


def test_corrupt_image_fails_unless_skip_bad(places_like, tmp_path):
    root, train, test = places_like
    (root / "train/bakery/00000001.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match=r"00000001.jpg: unreadable image .*--skip-bad"):
        prepare_lists(ListConfig(out=tmp_path / "o1", root=root, train_list=train, test_list=test))
    info = load_dataset(prepare_lists(ListConfig(out=tmp_path / "o2", root=root, train_list=train, test_list=test, skip_bad=True)))
    assert info.split("train").skipped == ["train/bakery/00000001"]
    assert info.split("train").class_counts == [3, 1]


def test_list_decompression_bomb_is_one_line_and_max_pixels_applies(places_like, tmp_path):
    from test_images import BOMB

    root, train, test = places_like  # 8 × 8 JPEGs
    (root / "train/bakery/00000001.jpg").write_bytes(BOMB)
    args = ["prepare", "list", "--root", str(root), "--train-list", str(train), "--test-list", str(test)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o1")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines() == [
        f"Error: {root}/train/bakery/00000001.jpg: unreadable image (decompression bomb: 20000×20000 = 400,000,000 "
        "pixels, above --max-pixels 89,478,485); pass --skip-bad to skip unreadable images"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o2"), "--max-pixels", "63", "--skip-bad"])
    assert result.exit_code != 0 and result.output.splitlines() == ["Error: split 'train': no readable images left"]
    info = load_dataset(prepare_lists(ListConfig(out=tmp_path / "o3", root=root, train_list=train, test_list=test, skip_bad=True, max_pixels=64)))
    assert info.split("train").skipped == ["train/bakery/00000001"] and "--skip-bad --max-pixels 64" in info.command
    with pytest.raises(UserError, match=r"^--max-pixels 0: must be an integer at least 1$"):
        prepare_lists(ListConfig(out=tmp_path / "o4", root=root, train_list=train, test_list=test, max_pixels=0))


def test_output_dir_holding_another_dataset_is_refused(places_like, tmp_path):
    root, train, test = places_like
    out = prepare_lists(ListConfig(out=tmp_path / "o", root=root, train_list=train, test_list=test))
    with pytest.raises(UserError, match="holds another dataset"):
        prepare_synthetic(SyntheticConfig(out=out, max_count=10, test_per_class=1, val_per_class=1))
    prepare_synthetic(SyntheticConfig(out=out, max_count=10, test_per_class=1, val_per_class=1, overwrite=True))
    assert load_dataset(out).name == "shapes-lt"


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["prepare", "list", "--root", str(tmp_path / "x"), "--train-list", "a",
                                       "--test-list", "b", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert result.output.strip() == f"Error: --root {tmp_path / 'x'}: image root directory not found"


def _fake_cifar(path: Path, per_class_train=6, per_class_test=2, replace=None):
    """A miniature of the official archive; ``replace``: {member name: bytes} written instead of its pickle."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.repeat(np.arange(100), n)
        return {b"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels.tolist(),
                b"filenames": [f"f{i}.png".encode() for i in range(len(labels))]}

    meta = {b"fine_label_names": [f"class_{i}".encode() if i else b"aquarium_fish" for i in range(100)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in (("train", split(per_class_train)), ("test", split(per_class_test)), ("meta", meta)):
            data = (replace or {}).get(name) or pickle.dumps(obj)
            ti = tarfile.TarInfo(f"cifar-100-python/{name}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def test_cifar100_lt_counts(tmp_path):
    assert sum(cifar_lt_counts(100)) == 10847 and cifar_lt_counts(100)[0] == 500 and cifar_lt_counts(100)[-1] == 5
    archive = _fake_cifar(tmp_path / "cifar-100-python.tar.gz")
    # with only 6 images per class, the long-tailed counts are capped by what exists
    info = load_dataset(prepare_cifar100_lt(CifarConfig(out=tmp_path / "c", archive=archive, imbalance=100, shard_size=200)))
    expected = [min(6, n) for n in cifar_lt_counts(100)]
    assert info.split("train").class_counts == expected
    assert info.split("test").class_counts == [2] * 100
    assert info.classnames[0] == "aquarium fish" and info.name == "cifar100-lt-r100"


class _Runs:
    """Unpickling this calls os.system: what a hostile CIFAR archive could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_archive_that_holds_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    good = {b"data": np.zeros((100, 3072), np.uint8), b"fine_labels": list(range(100))}
    cases = {
        "code": ({"train": pickle.dumps({**good, b"x": _Runs(marker)})}, r"'cifar-100-python/train' is not a CIFAR "
                                                                        r"pickle \(UnpicklingError: refusing to load "
                                                                        r"(posix|os)\.system\)"),
        "garbled": ({"test": b"\x80\x04garbage"}, r"'cifar-100-python/test' is not a CIFAR pickle"),
        "no data": ({"train": pickle.dumps({b"fine_labels": [0]})}, r"'cifar-100-python/train' has no 'data'"),
        "labels": ({"train": pickle.dumps({**good, b"fine_labels": [100] * 100})}, r".cifar-100-python/train. does not hold N × 3072 uint8 "
                                                                                  r"images with N labels below 100"),
        "shape": ({"test": pickle.dumps({**good, b"data": np.zeros((100, 7), np.uint8)})}, r".cifar-100-python/test. does not hold N × 3072"),
        "names": ({"meta": pickle.dumps({b"fine_label_names": "abc"})}, r"'cifar-100-python/meta' has no list of class "
                                                                        r"names"),
    }
    for case, (replace, message) in cases.items():
        archive = _fake_cifar(tmp_path / f"{case.replace(' ', '_')}.tar.gz", replace=replace)
        result = CliRunner().invoke(main, ["prepare", "cifar100-lt", "--archive", str(archive), "--out",
                                           str(tmp_path / "out")])
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (case, result.output)
        assert re.fullmatch(rf"Error: {re.escape(str(archive))}: {message}.*\n", result.output), (case, result.output)
        assert not marker.exists(), case
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.slow  # three prepare subprocesses, one killed
def test_interrupted_prepare_resumes_to_identical_shards(tmp_path):
    args = [sys.executable, "-m", "cli", "prepare", "synthetic", "--max-count", "300",
            "--shard-size", "50", "--test-per-class", "2", "--val-per-class", "1"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "train").glob("shard-*.tar"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists(), "killed too late to test resuming"
    with pytest.raises(UserError, match="unfinished prepare"):
        load_dataset(out)
    subprocess.run(args + ["--out", str(out)], check=True, capture_output=True)
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f


# ---------------------------------------------------------------- option checks, shard records, rebuilding
@pytest.mark.parametrize("args, message", [
    (["synthetic", "--imbalance", "nan"], "--imbalance nan: must be a finite ratio"),
    (["synthetic", "--imbalance", "inf"], "--imbalance inf: must be a finite ratio"),
    (["synthetic", "--imbalance", "0.5"], "--imbalance 0.5: must be a finite ratio n_max / n_min at least 1"),
    (["synthetic", "--shard-size", "0"], "--shard-size 0: must be an integer at least 1"),
    (["synthetic", "--seed", "-1"], re.escape("--seed -1: must be a whole number in [0, 2^32)")),
    (["synthetic", "--max-count", "0"], "--max-count 0: must be an integer at least 1"),
    (["synthetic", "--test-per-class", "0"], "--test-per-class 0: must be an integer at least 1"),
    (["synthetic", "--val-per-class", "0"], "--val-per-class 0: must be an integer at least 1"),
    (["synthetic", "--image-size", "4"], "--image-size 4: must be an integer from 8 to 1024"),
    (["cifar100-lt", "--archive", "a.tar.gz", "--imbalance", "501"], "--imbalance 501.0: .* from 1 to 500"),
    (["cifar100-lt", "--archive", "a.tar.gz", "--seed", "4294967296"], re.escape("--seed 4294967296: must be a whole number")),
    (["cifar100-lt", "--archive", "a.tar.gz", "--shard-size", "-5"], "--shard-size -5: must be an integer"),
    (["list", "--root", "r", "--train-list", "a", "--test-list", "b", "--seed", "-2"], re.escape("--seed -2: must be a whole number")),
    (["list", "--root", "r", "--train-list", "a", "--test-list", "b", "--shard-size", "0"], "--shard-size 0: must be"),
    (["list", "--root", "r", "--train-list", "a", "--test-list", "b", "--name", " "], "--name ' ': must be a non-empty"),
])
def test_every_option_is_checked_before_anything_is_read_or_written(tmp_path, args, message):
    # The inputs named (a.tar.gz, lists, root) do not exist: the option is refused before they are looked at.
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prepare", *args, "--out", str(out)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)  # an error message, no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.match(f"Error: {message}", lines[0]), result.output
    assert not out.exists()


SMALL = ["--max-count", "40", "--imbalance", "10", "--test-per-class", "2", "--val-per-class", "1", "--shard-size", "64"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small synthetic dataset written through the CLI (8 train shards), read-only in the tests."""
    out = tmp_path_factory.mktemp("small") / "shapes"
    result = CliRunner().invoke(main, ["prepare", "synthetic", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_json_records_each_shard_and_the_command_that_rebuilds_it(small, tmp_path):
    info = load_dataset(small)
    for split, s in info.splits.items():
        assert s.shard_bytes == [(small / rel).stat().st_size for rel in s.shards]
        assert s.shard_sha256 == [sha256_file(small / rel) for rel in s.shards]
    # The recorded command (less --out) writes the same dataset anywhere: it is what errors tell users to run.
    assert info.command.startswith("ballad-pipe prepare synthetic ") and "--out" not in info.command
    again = tmp_path / "again"
    result = CliRunner().invoke(main, shlex.split(info.command)[1:] + ["--out", str(again)])
    assert result.exit_code == 0, result.output
    assert _files(again) == _files(small)


def test_dataset_json_without_shard_records_still_loads(small, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(small, old)
    meta = json.loads((old / "dataset.json").read_text())
    del meta["command"]
    for s in meta["splits"].values():
        del s["shard_bytes"], s["shard_sha256"]
    (old / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset(old)
    assert info.command is None and len(info.urls("train")) == 8
    verify_shards(info, "train")  # tar and labels are still checked in full
    (old / "train" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match=r"shard-000001.tar: shard listed in dataset.json is missing; rebuild it with "
                                        r"`ballad-pipe prepare … --out .*old`"):
        info.urls("train")


def _damage(root: Path, how: str) -> Path:
    shard = root / "train" / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    if how == "flip":
        data[1500] ^= 0x01  # inside the first image: same size, the tar still reads
    elif how == "truncate":
        data = data[:3000]
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how, cheap_check_sees_it, message", [
    ("truncate", True, r"truncated or damaged shard \(3000 bytes, dataset.json records \d+\)"),
    ("flip", False, r"damaged shard \(its sha256 differs from dataset.json's\)"),
])
def test_damaged_shard_is_named_with_its_rebuild_command_and_prepare_rebuilds_it(small, tmp_path, how,
                                                                                  cheap_check_sees_it, message):
    out = tmp_path / "d"
    shutil.copytree(small, out)
    shard = _damage(out, how)
    info = load_dataset(out)
    full = f"{re.escape(str(shard))}: {message}; rebuild it with `{re.escape(info.command)} --out {re.escape(str(out))}`"
    if cheap_check_sees_it:  # readers (Phase A, extract) compare sizes at every start
        with pytest.raises(UserError, match=full):
            info.urls("train")
    else:
        assert len(info.urls("train")) == 8
    with pytest.raises(UserError, match=full):
        verify_shards(info, "train")
    result = CliRunner().invoke(main, shlex.split(info.command)[1:] + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _files(out) == _files(small)
