"""Data where users keep it: `prepare folder` (ImageFolder trees), `prepare index` (existing webdataset
shards, local, pipe: or http) and dataset.json read from a URL, with a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.errors import UserError
from pipeline.runtime import sha256_file
from stages.phase_a.data import check_shards
from stages.prepare.folder import FolderConfig, prepare_folder
from stages.prepare.index import IndexConfig, prepare_index
from stages.prepare.synthetic import SyntheticConfig, prepare_synthetic
from store.shards import LabelKey, ShardURL, load_dataset, read_shard, verify_shards
from store.stream import sample_stream
from test_images import HOSTILE


def _image(path: Path, value: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(path, format=fmt)


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for c, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            _image(root / cls / f"img_{i:03d}.jpg", 10 * c + i)
    return root


def _samples(path) -> dict[str, list]:
    info = load_dataset(path)
    return {split: [(s.key, s.label) for url in info.urls(split) for s in read_shard(url, info.label_key)]
            for split in info.splits}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines()


def _fails(match: str, *args) -> None:
    """The CLI refuses with one line, no traceback."""
    code, lines = _cli(*args)
    assert code != 0 and len(lines) == 1 and re.search(match, lines[0]), lines


# ---------------------------------------------------------------- prepare folder
FLAT = {"a_cat": 20, "dog": 10, "eel": 3}


def test_folder_flat_layout_stratified_split_keeps_class_proportions(tmp_path):
    root = _tree(tmp_path / "pets", FLAT)
    info = load_dataset(prepare_folder(FolderConfig(out=tmp_path / "o", root=root, val_fraction=0.1, test_fraction=0.2, shard_size=8)))
    assert info.classnames == ["a cat", "dog", "eel"] and info.name == "pets"
    # per class: round(0.2 n) to test, round(0.1 n) to val, the rest to train (eel: 0.6 → 1, 0.3 → 0)
    assert info.split("test").class_counts == [4, 2, 1]
    assert info.split("val").class_counts == [2, 1, 0]
    assert info.split("train").class_counts == [14, 7, 2]
    samples = _samples(info.root)
    keys = [k for split in samples.values() for k, _ in split]
    assert sorted(keys) == sorted(f"{c}/img_{i:03d}" for c, n in FLAT.items() for i in range(n))  # each image once
    assert all(k.startswith(("a_cat/", "dog/", "eel/")[label]) for split in samples.values() for k, label in split)
    assert samples["test"] == sorted(samples["test"], key=lambda kl: (kl[1], kl[0]))  # evaluation splits: sorted
    assert info.command.startswith("ballad-pipe prepare folder --root ")


def test_folder_split_is_deterministic_per_seed(tmp_path):
    root = _tree(tmp_path / "pets", FLAT)
    a, b, c = (prepare_folder(FolderConfig(out=tmp_path / n, root=root, seed=s, shard_size=8)) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _files(a) == _files(b)
    assert _samples(a)["test"] != _samples(c)["test"]
    assert load_dataset(a).split("test").class_counts == load_dataset(c).split("test").class_counts == [4, 2, 1]
    assert "val" not in load_dataset(a).splits  # --val-fraction defaults to 0


def test_folder_split_layout_keeps_the_given_splits(tmp_path):
    root = tmp_path / "given"
    _tree(root / "train", {"ant": 4, "bee": 3})
    _tree(root / "test", {"ant": 2, "bee": 1})
    _tree(root / "val", {"bee": 1})
    (root / "train" / "ant" / "notes.txt").write_text("not an image: ignored, as ImageFolder does")
    info = load_dataset(prepare_folder(FolderConfig(out=tmp_path / "o", root=root)))
    assert {s: i.class_counts for s, i in info.splits.items()} == {"train": [4, 3], "test": [2, 1], "val": [0, 1]}
    assert [k for k, _ in _samples(info.root)["test"]] == ["test/ant/img_000", "test/ant/img_001", "test/bee/img_000"]
    # no val/ folder: --val-fraction draws val from train/, per class
    shutil.rmtree(root / "val")
    info = load_dataset(prepare_folder(FolderConfig(out=tmp_path / "o2", root=root, val_fraction=0.5)))
    assert {s: i.class_counts for s, i in info.splits.items()} == {"train": [2, 1], "test": [2, 1], "val": [2, 2]}
    with pytest.raises(UserError, match="--test-fraction 0.1: .* has a test/ folder"):
        prepare_folder(FolderConfig(out=tmp_path / "o3", root=root, test_fraction=0.1))
    _tree(root / "test", {"wasp": 1})
    with pytest.raises(UserError, match=r"test/wasp: class folder not in .*given/train$"):
        prepare_folder(FolderConfig(out=tmp_path / "o4", root=root))


def test_folder_classes_file_overrides_the_folder_names(tmp_path):
    root = _tree(tmp_path / "pets", FLAT)
    classes = tmp_path / "names.txt"
    classes.write_text("house cat\ndomestic dog\nmoray eel\n")
    info = load_dataset(prepare_folder(FolderConfig(out=tmp_path / "o", root=root, classes=str(classes))))
    assert info.classnames == ["house cat", "domestic dog", "moray eel"]
    assert f"--classes {classes}" in info.command
    classes.write_text("house cat\ndomestic dog\n")
    _fails(r"^Error: --classes .*names.txt: 2 names for the 3 class folders of .*pets$",
           "prepare", "folder", "--root", root, "--classes", classes, "--out", tmp_path / "o2")


def test_folder_bad_image_fails_unless_skip_bad(tmp_path):
    root = _tree(tmp_path / "pets", FLAT)
    (root / "dog" / "img_004.jpg").write_bytes(b"not a jpeg")
    _fails(r"^Error: .*dog/img_004.jpg: unreadable image \(unknown image format\); pass --skip-bad",
           "prepare", "folder", "--root", root, "--out", tmp_path / "o1")
    info = load_dataset(prepare_folder(FolderConfig(out=tmp_path / "o2", root=root, skip_bad=True)))
    lost = [s for s, i in info.splits.items() if i.skipped == ["dog/img_004"]]
    assert len(lost) == 1 and sum(sum(i.class_counts) for i in info.splits.values()) == sum(FLAT.values()) - 1


@pytest.mark.parametrize("kind", HOSTILE)
def test_folder_hostile_image_stops_with_one_line_or_is_skipped_and_reported(tmp_path, kind, caplog):
    suffix, data, reason = HOSTILE[kind]
    root = _tree(tmp_path / "pets", FLAT)
    bad = root / "dog" / f"hostile.{suffix}"
    bad.write_bytes(data)
    result = CliRunner().invoke(main, ["prepare", "folder", "--root", str(root), "--out", str(tmp_path / "o1")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines() == [f"Error: {bad}: unreadable image ({reason}); pass --skip-bad to skip "
                                          "unreadable images"]
    code, lines = _cli("prepare", "folder", "--root", root, "--out", tmp_path / "o2", "--skip-bad")
    assert code == 0, lines
    info = load_dataset(tmp_path / "o2")
    assert [k for i in info.splits.values() for k in i.skipped] == ["dog/hostile"]
    assert sum(sum(i.class_counts) for i in info.splits.values()) == sum(FLAT.values())  # all the others
    assert any(re.fullmatch(r"\w+: skipped 1 unreadable image\(s\): dog/hostile", r.getMessage()) for r in caplog.records)


def test_folder_max_pixels_is_checked_first_applies_to_every_image_and_is_recorded(tmp_path):
    root = _tree(tmp_path / "pets", FLAT)  # 8 × 8 images
    folder = ["prepare", "folder", "--root", root]
    _fails(r"^Error: --max-pixels 0: must be an integer at least 1$", *folder, "--out", tmp_path / "o", "--max-pixels", "0")
    assert not (tmp_path / "o").exists()
    _fails(r"^Error: .*/img_0\d\d.jpg: unreadable image \(decompression bomb: 8×8 = 64 pixels, above --max-pixels "
           r"63\); pass --skip-bad to skip unreadable images$", *folder, "--out", tmp_path / "o", "--max-pixels", "63")
    info = load_dataset(prepare_folder(FolderConfig(out=tmp_path / "o2", root=root, max_pixels=64)))
    assert sum(sum(i.class_counts) for i in info.splits.values()) == sum(FLAT.values())
    assert info.command.endswith(" --max-pixels 64")


def test_folder_bad_input_gives_one_line_errors(tmp_path):
    root = _tree(tmp_path / "pets", FLAT)
    out = tmp_path / "o"
    _fails(r"^Error: --root .*nowhere: image folder not found$", "prepare", "folder", "--root", tmp_path / "nowhere",
           "--out", out)
    (root / "fish").mkdir()
    _fails(r"^Error: .*pets/fish: class folder holds no images \(.jpg, .jpeg, .png", "prepare", "folder", "--root",
           root, "--out", out)
    (root / "fish").rmdir()
    _fails(r"^Error: .*pets/eel: its 3 image\(s\) leave none for train with --test-fraction 0.5 --val-fraction 0.4;",
           "prepare", "folder", "--root", root, "--test-fraction", "0.5", "--val-fraction", "0.4", "--out", out)
    _image(root / "dog" / "img_000.png", 1, "PNG")  # img_000.jpg is there too
    _fails(r"^Error: split 'train' of pets: two images give the sample key 'dog/img_000'", "prepare", "folder",
           "--root", root, "--test-fraction", "0", "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(r"^Error: .*empty: no class folders", "prepare", "folder", "--root", empty, "--out", out)
    half = tmp_path / "half"
    _tree(half / "train", {"ant": 2})
    _tree(half / "val", {"ant": 1})
    _fails(r"^Error: --root .*half: has train/ and val/ but no test/ folder", "prepare", "folder", "--root", half,
           "--out", out)


@pytest.mark.parametrize("args, message", [
    (["--test-fraction", "nan"], "--test-fraction nan: must be a fraction from 0 to below 1"),
    (["--val-fraction", "1"], "--val-fraction 1.0: must be a fraction from 0 to below 1"),
    (["--val-fraction", "-0.1"], "--val-fraction -0.1: must be a fraction"),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"], r"--val-fraction 0.5 \+ --test-fraction 0.5: must add up"),
    (["--seed", "-1"], re.escape("--seed -1: must be a whole number")),
    (["--shard-size", "0"], "--shard-size 0: must be an integer"),
    (["--name", " "], "--name ' ': must be a non-empty"),
])
def test_folder_options_are_checked_before_anything_is_read(tmp_path, args, message):
    out = tmp_path / "out"
    _fails(f"^Error: {message}", "prepare", "folder", "--root", tmp_path / "absent", *args, "--out", out)
    assert not out.exists()


# ---------------------------------------------------------------- prepare index
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small prepared dataset: 3 train shards, 1 test shard; and its class names file."""
    root = tmp_path_factory.mktemp("shapes")
    out = prepare_synthetic(SyntheticConfig(out=root / "ds", max_count=12, imbalance=4, test_per_class=1, val_per_class=1, shard_size=64))
    assert len(load_dataset(out).split("train").shards) == 3
    names = root / "classes.txt"
    names.write_text("\n".join(load_dataset(out).classnames) + "\n")
    return out, names


def test_index_describes_our_own_shards_in_place(shapes, tmp_path):
    ds, names = shapes
    src = load_dataset(ds)
    out = prepare_index(IndexConfig(out=tmp_path / "idx", shards=[f"train={ds}/train/shard-{{000000..000002}}.tar",
                                           f"test={ds}/test/shard-000000.tar"], classes=str(names)))
    info = load_dataset(out)
    assert not list(out.glob("**/*.tar"))  # nothing copied
    assert info.indexed and info.label_key == LabelKey("cls") and info.classnames == src.classnames
    for split in ("train", "test"):
        s, ref = info.split(split), src.split(split)
        assert s.shards == [str(ds / rel) for rel in ref.shards]  # absolute
        assert s.class_counts == ref.class_counts and s.num_samples == ref.num_samples
        assert s.shard_bytes == ref.shard_bytes and s.shard_sha256 == ref.shard_sha256
        assert s.image_exts == {"png": ref.num_samples}
        assert info.urls(split) == src.urls(split) and type(info.urls(split)[0]) is str  # default: plain paths
    assert check_shards(info, "train") == src.urls("train")
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["label_key"] == "cls" and raw["indexed"] is True and "val" not in raw["splits"]
    assert raw["command"].startswith("ballad-pipe prepare index --shards 'train=/")
    # the same shards described again give the same dataset; another description needs --overwrite
    assert prepare_index(IndexConfig(out=tmp_path / "idx", shards=[f"train={ds}/train/shard-*.tar", f"test={ds}/test/shard-000000.tar"],
                         classes=str(names))) == out
    assert load_dataset(out).fingerprint == info.fingerprint
    with pytest.raises(UserError, match="holds another dataset"):
        prepare_index(IndexConfig(out=tmp_path / "idx", shards=[f"train={ds}/train/shard-000000.tar"], classes=str(names)))


def _write_tar(path: Path, samples, directory_entry: bool = True) -> None:
    """A tar as other tools write them: directory entries, .jpeg images, .json metadata, a caption."""
    with tarfile.open(path, "w") as tar:
        if directory_entry:
            ti = tarfile.TarInfo("photos")
            ti.type = tarfile.DIRTYPE
            tar.addfile(ti)
        for key, label in samples:
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 20 * label, np.uint8)).save(buf, format="JPEG")
            meta = json.dumps({"label": label, "caption": f"photo {key}", "width": 8}).encode()
            for ext, data in (("jpeg", buf.getvalue()), ("json", meta), ("txt", f"photo {key}".encode())):
                ti = tarfile.TarInfo(f"photos/{key}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


@pytest.fixture
def foreign(tmp_path):
    """Three hand-written shards (labels in a .json field) under tmp/www/shards, and a 3-class names file."""
    shards = tmp_path / "www" / "shards"
    shards.mkdir(parents=True)
    labels = [[0, 0, 1, 2], [0, 1, 1], [2, 0]]
    for i, ls in enumerate(labels):
        _write_tar(shards / f"part-{i}.tar", [(f"s{i}_{j:02d}", lab) for j, lab in enumerate(ls)])
    names = tmp_path / "classes.txt"
    names.write_text("zero\none\ntwo\n")
    return shards, names, labels


def test_index_hand_written_tars_with_a_json_label_key(foreign, tmp_path):
    shards, names, labels = foreign
    out = shards.parent  # the shards lie under --out: listed relative, so the directory moves and serves whole
    code, lines = _cli("prepare", "index", "--shards", f"train={shards}/part-{{0..2}}.tar", "--classes", names,
                       "--label-key", "json:label", "--out", out)
    assert code == 0, lines
    info = load_dataset(out)
    s = info.split("train")
    assert s.shards == ["shards/part-0.tar", "shards/part-1.tar", "shards/part-2.tar"]
    assert s.class_counts == [4, 3, 2] and s.image_exts == {"jpeg": 9}
    assert s.shard_sha256 == [sha256_file(shards / f"part-{i}.tar") for i in range(3)]
    assert info.label_key == LabelKey("json", "label") and json.loads((out / "dataset.json").read_text())["label_key"] == "json:label"
    urls = info.urls("train")
    assert all(isinstance(u, ShardURL) and u.label_key == info.label_key for u in urls)
    assert pickle.loads(pickle.dumps(urls)) == urls and pickle.loads(pickle.dumps(urls[0])).label_key == info.label_key
    streamed = [(key, label) for key, _, label in sample_stream(urls, split_by_worker=False)]
    assert streamed == [(f"photos/s{i}_{j:02d}", lab) for i, ls in enumerate(labels) for j, lab in enumerate(ls)]
    assert check_shards(info, "train") == urls
    verify_shards(info, "train")  # sha256, the tar to its end and the labels, with the json label key
    # a described shard that changes afterwards is named, with what to do
    (shards / "part-1.tar").write_bytes((shards / "part-1.tar").read_bytes()[:2048])
    with pytest.raises(UserError, match=r"part-1.tar: truncated or damaged shard \(2048 bytes, .*; restore it, or "
                                        r"describe the shards again with `ballad-pipe prepare index .* --overwrite`"):
        info.urls("train")


def test_index_reads_pipe_commands_and_http(foreign, server):
    shards, names, labels = foreign
    www, base = server
    shutil.copytree(shards, www / "foreign")
    local = load_dataset(prepare_index(IndexConfig(out=shards.parent / "local", shards=[f"train={shards}/part-{{0..2}}.tar"], classes=str(names),
                                       label_key="json:label")))
    for pattern in (f"pipe:cat {shards}/part-{{0..2}}.tar", f"{base}/foreign/part-{{0..2}}.tar"):
        described = prepare_index(IndexConfig(out=shards.parent / "remote", shards=[f"train={pattern}"], classes=str(names), label_key="json:label",
                                  overwrite=True))  # typed here, the commands run
        info = load_dataset(described, allow_commands=True)
        s = info.split("train")
        assert s.class_counts == local.split("train").class_counts and s.shard_bytes == [None] * 3
        assert s.shards[0] == pattern.replace("{0..2}", "0") and info.urls("train")[2].endswith("part-2.tar")
        assert len({info.fingerprint, local.fingerprint}) == 2  # the URLs are part of it
        streamed = [label for _, _, label in sample_stream(info.urls("train"), split_by_worker=False)]
        assert sorted(streamed) == sorted(lab for ls in labels for lab in ls)
    with pytest.raises(UserError, match=r"^pipe:cat .*part-0.tar: a shard command in .*dataset.json; run it only if "
                                        r"you trust that file: pass --allow-commands$"):
        prepare_index(IndexConfig(out=shards.parent / "remote", shards=[f"train=pipe:cat {shards}/part-{{0..2}}.tar"], classes=str(names),
                      label_key="json:label", overwrite=True))
        load_dataset(shards.parent / "remote").urls("train")  # read back without the reader's consent


def test_index_bad_input_gives_one_line_errors(foreign, shapes, server, tmp_path):
    shards, names, _ = foreign
    ds, shape_names = shapes
    out = tmp_path / "o"
    index = ["prepare", "index", "--out", out, "--classes"]
    _fails(r"^Error: --shards train=.*/nope-\{0..2\}.tar: matches no file$", *index, names, "--shards",
           f"train={shards}/nope-{{0..2}}.tar")
    _fails(r"^Error: --shards train=.*/\*.zip: matches no file$", *index, names, "--shards", f"train={shards}/*.zip")
    _fails(r"^Error: --shards train=.*: .*part-3.tar not found \(1 of the 4 shards it names\)$", *index, names,
           "--shards", f"train={shards}/part-{{0..3}}.tar")
    _fails(r"^Error: .*part-0.tar: sample 'photos/s0_00' has no .cls member for --label-key cls; it has: jpeg, "
           r"json, txt$", *index, names, "--shards", f"train={shards}/part-0.tar")
    _fails(r"^Error: .*part-0.tar: sample 'photos/s0_00': unreadable label for --label-key json:id \(no field 'id' "
           r"in its .json \(KeyError\)\)$", *index, names, "--label-key", "json:id", "--shards",
           f"train={shards}/part-0.tar")
    _fails(r"^Error: --label-key 'jpeg': expected EXT", *index, names, "--label-key", "jpeg", "--shards",
           f"train={shards}/part-0.tar")
    two = tmp_path / "two.txt"
    two.write_text("zero\none\n")  # the shards use label 2
    _fails(r"^Error: .*part-0.tar: sample 'photos/s0_03' has label 2, outside the 2 classes of --classes .*two.txt$",
           *index, two, "--label-key", "json:label", "--shards", f"train={shards}/part-0.tar")
    _fails(r"^Error: --shards .*part-0.tar: expected SPLIT=PATTERN", *index, names, "--shards", f"{shards}/part-0.tar")
    _fails(r"^Error: --shards test=.*: split 'test' is given twice$", *index, names, "--shards",
           f"test={shards}/part-0.tar", "--shards", f"test={shards}/part-1.tar")
    _fails(r"^Error: --shards text=.*: 'text' cannot name a split", *index, names, "--shards", f"text={shards}/part-0.tar")
    binary = tmp_path / "classes.bin"
    binary.write_bytes(b"\xff\xfe\x00zero\n")
    _fails(r"^Error: --classes .*classes.bin: not a UTF-8 text file of class names", *index, binary, "--shards",
           f"train={shards}/part-0.tar")
    _fails(r"^Error: --classes .*absent.txt: file not found", *index, tmp_path / "absent.txt", "--shards",
           f"train={shards}/part-0.tar")
    _fails(r"^Error: --workers 0: must be an integer from 1 to 64$", *index, names, "--workers", "0", "--shards",
           f"train={shards}/part-0.tar")
    _, base = server
    _fails(rf"^Error: {base}/absent-0.tar: cannot be read \(FileNotFoundError",
           *index, shape_names, "--shards", f"train={base}/absent-{{0..1}}.tar")
    (shards / "part-9.tar").write_bytes(b"\0" * 100)
    _fails(r"^Error: .*part-9.tar: unreadable shard \(ReadError", *index, names, "--label-key", "json:label",
           "--shards", f"train={shards}/part-9.tar")
    assert not (out / "dataset.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--label-key", "json:"], "--label-key 'json:': expected EXT"),
    (["--label-key", "png"], "--label-key 'png': expected EXT"),
    (["--workers", "0"], "--workers 0: must be an integer from 1 to 64"),
    (["--name", ""], "--name '': must be a non-empty"),
    (["--out", "http://127.0.0.1:9/ds"], "--out http://127.0.0.1:9/ds: must be a local directory"),
    (["--shards", "=a.tar"], "--shards =a.tar: expected SPLIT=PATTERN"),
])
def test_index_options_are_checked_before_anything_is_read(tmp_path, args, message):
    # the classes file does not exist: options are refused before it is looked at
    out = tmp_path / "out"
    base = {"--shards": "train=absent.tar", "--out": str(out), "--classes": str(tmp_path / "absent.txt")}
    given = dict(zip(args[::2], args[1::2]))
    rest = [x for k, v in base.items() if k not in given for x in (k, v)]
    _fails(f"^Error: {message}", "prepare", "index", *args, *rest)
    assert not out.exists()


# ---------------------------------------------------------------- dataset.json at a URL
@pytest.fixture(scope="module")
def served(server, shapes):
    """The shapes dataset (our own shards, relative paths in dataset.json) served at BASE/shapes."""
    www, base = server
    shutil.copytree(shapes[0], www / "shapes")
    return f"{base}/shapes"


def test_load_dataset_from_a_url(served, shapes, server):
    ds = shapes[0]
    local = load_dataset(ds)
    for where in (served, served + "/", served + "/dataset.json"):
        info = load_dataset(where)
        assert str(info.root) == served and info.fingerprint == local.fingerprint
        assert info.urls("train") == [f"{served}/{rel}" for rel in local.split("train").shards]
        assert str(info.root / "dataset.json") == served + "/dataset.json"
    assert check_shards(load_dataset(served), "train") == load_dataset(served).urls("train")  # checked as they stream
    assert load_dataset(ds / "dataset.json").root == ds  # the file, locally too
    _, base = server
    with pytest.raises(UserError, match=rf"^{base}/elsewhere/dataset.json: not found; {base}/elsewhere is not a "
                                        r"prepared dataset$"):
        load_dataset(f"{base}/elsewhere")
    with pytest.raises(UserError, match=r"^http://127.0.0.1:9/ds/dataset.json: cannot be read \("):
        load_dataset("http://127.0.0.1:9/ds")  # the discard port: nothing listens


def _arrays(store: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    out = {"text/embeddings": root["text/embeddings"][:]}
    for split in ("train", "val", "test"):
        out.update({f"{split}/{a}": root[f"{split}/{a}"][:] for a in ("image", "label", "key")})
    return out


def test_extract_from_http_gives_the_same_store_as_from_the_directory(served, shapes, tmp_path, single_thread):
    common = ["extract", "--ckpt", "none", "--model", "ballad-tiny", "--batch-size", "64", "--workers", "1",
              "--device", "cpu"]
    for data, out in ((shapes[0], tmp_path / "local.zarr"), (served, tmp_path / "http.zarr")):
        code, lines = _cli(*common, "--data", data, "--out", out)
        assert code == 0, lines
    local, remote = _arrays(tmp_path / "local.zarr"), _arrays(tmp_path / "http.zarr")
    assert sorted(local) == sorted(remote)
    for name in local:
        np.testing.assert_array_equal(local[name], remote[name], err_msg=name)
    assert len(local["train/label"]) == load_dataset(shapes[0]).split("train").num_samples
    assert zarr.open_group(str(tmp_path / "http.zarr"), mode="r").attrs["dataset"]["path"] == served


def test_phase_a_runs_from_http(served, tmp_path, single_thread):
    from stages.phase_a import PhaseAConfig, run_phase_a

    out = tmp_path / "run"
    run_phase_a(PhaseAConfig(data=served + "/dataset.json", out=str(out), model="ballad-tiny", epochs=1,
                             schedule="standard", batch_size=32, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                             workers=0, shuffle_buffer=50, select="last", eval_every=0, device="cpu"))
    meta = json.loads((out / "final.json").read_text())
    assert meta["dataset"]["path"] == served and meta["steps"] == load_dataset(served).split("train").num_samples // 32
