"""prepare --max-side / --jpeg-quality: large images stored smaller, everything else byte for byte."""
from __future__ import annotations

import io
import json
import pickle
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, JpegImagePlugin

from cli import main
from stages.prepare.writer import JPEG_QUALITY, ORIENTATION
from store.shards import load_dataset, read_shard
from store.stream import decode_sample

ICC = b"not a real profile, carried as bytes"


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field with noise: compresses like a photo, so JPEG quality shows in the bytes."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = np.clip(np.asarray(base, np.int16) + rng.integers(-25, 26, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _see_through(width: int, height: int) -> Image.Image:
    """A 1-pixel black and white checkerboard, the white squares transparent: grey once alpha is dropped
    (what our decoder does), black when resized with alpha (Pillow weights colours by it)."""
    white = (np.indices((height, width)).sum(0) % 2).astype(bool)
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[white, :3] = 255
    rgba[~white, 3] = 255
    return Image.fromarray(rgba)


# file → (size, how it is saved); the longer side of the first three exceeds 100, the others do not
IMAGES = {
    "train/cat/wide.jpg": ((300, 200), {}),
    "train/cat/rotated.jpg": ((240, 160), {"orientation": 6}),  # stored landscape, shown portrait by EXIF-aware viewers
    "train/dog/tall.png": ((90, 250), {"mode": "RGBA"}),
    "train/dog/small.jpg": ((100, 60), {}),
    "test/cat/small.png": ((64, 64), {}),
    "test/dog/small.jpg": ((40, 80), {}),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, (rel, ((w, h), how)) in enumerate(IMAGES.items()):
        img = _see_through(w, h) if how.get("mode") == "RGBA" else _photo(w, h, i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        extra = {}
        if "orientation" in how:
            exif = Image.Exif()
            exif[ORIENTATION] = how["orientation"]
            extra = {"exif": exif.tobytes(), "icc_profile": ICC}
        img.save(root / rel, quality=95, **extra)
    return root


def _prepare(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["prepare", *map(str, args)])
    return result.exit_code, result.output.strip().splitlines()


def _stored(out: Path) -> dict[str, tuple[str, bytes]]:
    """Sample key → (ext, image bytes) over every split."""
    info = load_dataset(out)
    return {s.key: (s.ext, s.image) for split in info.splits for url in info.urls(split) for s in read_shard(url)}


def _decoded(ext: str, data: bytes) -> Image.Image:
    """What the CPU training and extraction path decodes (before its transforms)."""
    return decode_sample({"__key__": "k", ext: data, "cls": b"0"})[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shrunk(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shrunk") / "d"
    code, lines = _prepare("folder", "--root", photos, "--max-side", 100, "--out", out)
    assert code == 0, lines
    return out


def test_large_images_shrink_to_max_side_with_their_aspect_and_small_ones_keep_their_bytes(photos, shrunk):
    stored = _stored(shrunk)
    assert len(stored) == len(IMAGES)
    for rel, ((w, h), _) in IMAGES.items():
        ext, data = stored[rel.rsplit(".", 1)[0]]
        if max(w, h) > 100:
            with Image.open(io.BytesIO(data)) as im:
                assert (ext, im.format) == ("jpg", "JPEG")
                assert max(im.size) == 100 and im.size[0] / im.size[1] == pytest.approx(w / h, abs=0.01), rel
                assert JpegImagePlugin.get_sampling(im) == 0, rel  # 4:4:4: colour kept at full resolution
        else:
            assert data == (photos / rel).read_bytes(), rel


def test_shrunk_images_decode_like_their_originals(photos, shrunk):
    stored = _stored(shrunk)
    # Pixels are resized as stored, not turned by the EXIF orientation, which is carried over with the ICC
    # profile: a decoder that ignores them (ours) or honours them sees the original's orientation and colours.
    with Image.open(io.BytesIO(stored["train/cat/rotated"][1])) as im:
        assert im.size == (100, 67) and im.getexif()[ORIENTATION] == 6 and im.info["icc_profile"] == ICC
    # A mode the decoder converts (RGBA: alpha dropped) is converted the same way before resizing: the
    # checkerboard turns grey, as the original does once decoded and resized, not black.
    original = _decoded("png", (photos / "train/dog/tall.png").read_bytes())
    small = _decoded(*stored["train/dog/tall"])
    assert small.mode == "RGB" and small.size == (36, 100)
    expected = np.asarray(original.resize(small.size, Image.Resampling.LANCZOS), np.float32)
    assert expected.mean() == pytest.approx(127.5, abs=5)
    assert np.abs(np.asarray(small, np.float32) - expected).mean() < 3


def test_dataset_json_records_the_settings_and_the_recorded_command_rebuilds_the_same_bytes(photos, shrunk, tmp_path):
    meta = json.loads((shrunk / "dataset.json").read_text())
    assert (meta["max_side"], meta["jpeg_quality"]) == (100, JPEG_QUALITY)
    assert meta["command"].endswith(f" --max-side 100 --jpeg-quality {JPEG_QUALITY}")
    again = tmp_path / "again"
    code, lines = _prepare(*shlex.split(meta["command"])[2:], "--out", again)
    assert code == 0, lines
    assert _files(again) == _files(shrunk)
    plain = tmp_path / "plain"
    assert _prepare("folder", "--root", photos, "--out", plain)[0] == 0
    without = json.loads((plain / "dataset.json").read_text())
    assert "max_side" not in without and "jpeg_quality" not in without and "--max-side" not in without["command"]
    assert without["fingerprint"] != meta["fingerprint"]  # Phase A's --resume and the feature store see the change


def test_jpeg_quality_sets_the_shrunk_images_bytes_only(photos, tmp_path):
    stored = {}
    for q in (30, 95):
        out = tmp_path / f"q{q}"
        assert _prepare("folder", "--root", photos, "--max-side", 100, "--jpeg-quality", q, "--out", out)[0] == 0
        stored[q] = _stored(out)
        assert json.loads((out / "dataset.json").read_text())["jpeg_quality"] == q
    for rel, ((w, h), _) in IMAGES.items():
        low, high = (stored[q][rel.rsplit(".", 1)[0]][1] for q in (30, 95))
        if max(w, h) > 100:
            assert len(low) < 0.7 * len(high), rel
        else:
            assert low == high == (photos / rel).read_bytes(), rel


def test_other_settings_in_the_same_out_are_another_dataset_and_a_kill_resumes_to_the_same_bytes(photos, shrunk, tmp_path):
    out = tmp_path / "d"
    assert _prepare("folder", "--root", photos, "--max-side", 100, "--shard-size", 2, "--out", out)[0] == 0
    ref = _files(out)
    (out / "dataset.json").unlink()  # as a kill before the end leaves it
    (out / "train" / "shard-000001.tar").unlink()
    assert _prepare("folder", "--root", photos, "--max-side", 100, "--shard-size", 2, "--out", out)[0] == 0
    assert _files(out) == ref
    for other in (["--max-side", 120], ["--max-side", 100, "--jpeg-quality", 80], []):
        code, lines = _prepare("folder", "--root", photos, *other, "--shard-size", 2, "--out", out)
        assert code != 0 and lines == [f"Error: {out}: holds another dataset (dataset.json differs); choose another "
                                       "--out or pass --overwrite"]
    assert _prepare("folder", "--root", photos, "--max-side", 120, "--shard-size", 2, "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "dataset.json").read_text())["max_side"] == 120
    with Image.open(io.BytesIO(_stored(out)["train/cat/wide"][1])) as im:
        assert im.size == (120, 80)


def _fake_cifar(path: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.repeat(np.arange(100), n)
        return {b"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels.tolist()}

    with tarfile.open(path, "w:gz") as tar:
        for name, obj in (("train", split(2)), ("test", split(1)), ("meta", {b"fine_label_names": [b"c"] * 100})):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("source, args, side", [
    ("synthetic", ["--max-count", 6, "--imbalance", 3, "--test-per-class", 1, "--val-per-class", 1,
                   "--image-size", 48], 48),
    ("cifar100-lt", ["--imbalance", 2], 32),
])
def test_generated_sources_shrink_too(tmp_path, source, args, side):
    if source == "cifar100-lt":
        args = ["--archive", _fake_cifar(tmp_path / "c.tar.gz"), *args]
    out = tmp_path / "d"
    assert _prepare(source, *args, "--max-side", 20, "--jpeg-quality", 75, "--out", out)[0] == 0
    stored = _stored(out)
    for ext, data in stored.values():
        with Image.open(io.BytesIO(data)) as im:
            assert (ext, im.size) == ("jpg", (20, 20))
    assert _prepare(source, *args, "--max-side", side, "--out", tmp_path / "same")[0] == 0  # nothing exceeds it
    assert all(ext == "png" for ext, _ in _stored(tmp_path / "same").values())


ROOT_ARGS = {"list": ["--root", "r", "--train-list", "a", "--test-list", "b"], "folder": ["--root", "r"],
             "synthetic": [], "cifar100-lt": ["--archive", "a.tar.gz"]}


@pytest.mark.parametrize("source", list(ROOT_ARGS))
@pytest.mark.parametrize("args, message", [
    (["--max-side", 0], "--max-side 0: must be an integer from 8 to 65500"),
    (["--max-side", 7], "--max-side 7: must be an integer from 8 to 65500"),
    (["--max-side", 70000], "--max-side 70000: must be an integer from 8 to 65500"),
    (["--max-side", 256, "--jpeg-quality", 0], "--jpeg-quality 0: must be an integer from 1 to 100"),
    (["--max-side", 256, "--jpeg-quality", 101], "--jpeg-quality 101: must be an integer from 1 to 100"),
    (["--jpeg-quality", 80], re.escape("--jpeg-quality 80: applies only with --max-side (without it every image "
                                       "keeps its original bytes)")),
])
def test_bad_settings_are_one_line_before_anything_is_read(tmp_path, source, args, message):
    # The inputs named (r, a, b, a.tar.gz) do not exist: the options are refused before they are looked at.
    out = tmp_path / "out"
    code, lines = _prepare(source, *ROOT_ARGS[source], *args, "--out", out)
    assert code not in (0, None) and len(lines) == 1 and re.fullmatch(f"Error: {message}", lines[0]), lines
    assert not out.exists()


def test_index_copies_nothing_so_it_has_no_max_side(tmp_path):
    code, lines = _prepare("index", "--shards", "train=x.tar", "--classes", "c", "--max-side", 256, "--out", tmp_path)
    assert code == 2 and lines[-1] == "Error: No such option '--max-side'."


def test_help_states_the_default_quality():
    result = CliRunner().invoke(main, ["prepare", "folder", "--help"])
    assert f"[default: {JPEG_QUALITY}]" in " ".join(result.output.split())
