"""Stage `prepare`: long-tailed datasets → webdataset shards (see store/shards.py for the format).

Four sources share one writer: the generated shapes demo, ImageNet-LT / Places-LT style split lists
(`relative/path.jpg <label>` per line), image folders in torchvision's ImageFolder layout (turned
into the same (path, label) lists) and CIFAR-100-LT cut from the official python archive. Every
source is turned into lazy sample specs first, so re-running after an interruption skips complete
shards without generating, reading or decoding anything for them. Every option is checked before
anything is read or written, and the writer holds the output's lock (pipeline/locks.py) for the
whole run, so two runs never interleave their shards. Images keep their bytes unless ``--max-side``
asks for smaller shards (``Shrink``).

A fifth source writes no shards: `index` describes webdataset shards that exist already (local,
http(s), pipe:, …) in a dataset.json that lists their URLs, after one scan for labels and counts.
Data sources, dataset.json's fields and what is checked when: docs/data.md.
"""
from __future__ import annotations

import collections
import concurrent.futures
import glob
import hashlib
import io
import json
import logging
import math
import numbers
import os
import pickle
import re
import shlex
import shutil
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS, BadImage, open_image, read_file, read_header
from pipeline.locks import exclusive_lock
from pipeline.options import check_int
from pipeline.runtime import progress, sha256_file, write_json
from pipeline.text import DEFAULT_TEMPLATE
from pipeline.validate import Field, check, describe, fits, show
from store.shards import (DATASET_FILE, IMAGE_EXTS, MARKER_FILE, RESERVED_SPLITS, SHARD_PATTERN, SPLIT_NAME,
                          TAXONOMY_LEVELS, LabelKey, Sample, Taxonomy, has_scheme, local_path, read_shard, write_shard)
from store.trust import open_shard

log = logging.getLogger("ballad.prepare")

# numpy's RandomState, which the CIFAR recipe uses, takes seeds below 2**32; every source takes the same range.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Spec:
    """A sample not yet materialised: ``load()`` returns (ext, image bytes)."""

    key: str
    label: int
    load: Callable[[], tuple[str, bytes]]


# ---------------------------------------------------------------- option checks and the recorded command
def _check_imbalance(value, highest: float = math.inf, why: str = "") -> None:
    """ρ = n_max / n_min: finite, at least 1, and at most ``highest`` where a larger one would empty a class."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and 1 <= value <= highest):
        span = "at least 1" if highest == math.inf else f"from 1 to {highest} ({why})"
        raise UserError(f"--imbalance {value}: must be a finite ratio n_max / n_min {span}")


def _check_fraction(option: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not (math.isfinite(value) and 0 <= value < 1)):
        raise UserError(f"{option} {value}: must be a fraction from 0 to below 1")


def _check_name(name) -> None:
    if name is not None and (not name.strip() or "\n" in name):
        raise UserError(f"--name {name!r}: must be a non-empty single line")


def _check_out(out) -> Path:
    """prepare writes a local directory; one at a URL is served or uploaded afterwards (docs/data.md)."""
    if has_scheme(os.fspath(out)):
        raise UserError(f"--out {out}: must be a local directory (serve or upload it afterwards)")
    return Path(out)


def _command(source: str, **options) -> str:
    """``ballad-pipe prepare SOURCE --option value …`` without --out: dataset.json records it so that an
    error about a missing or damaged shard can name the command that rebuilds it (store.shards). A list
    value repeats its option."""
    args = ["ballad-pipe", "prepare", source]
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v is not False:
                args += [flag] + ([] if v is True else [str(v)])
    return shlex.join(args)


def _absolute(path) -> str | None:
    """Input paths as the recorded command names them: absolute, so it works from any directory."""
    return None if path is None else str(Path(path).absolute())


# ---------------------------------------------------------------- --max-side: smaller shards
JPEG_QUALITY = 90  # --jpeg-quality's default: visually lossless for photos, about a third of quality 100's bytes
JPEG_MAX_SIDE = 65500  # the largest side libjpeg (and so Pillow) can write
ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class Shrink:
    """``--max-side S --jpeg-quality Q``: an image whose longer side exceeds S is stored at S on that side
    (aspect kept) as a JPEG of quality Q; every other image keeps its bytes, as without the option.

    Decoding, not the model, bounds Phase A on a GPU (README), and a JPEG's decode time grows with its
    pixels, so images stored nearer the model's input size decode faster and the shards shrink with
    them (docs/data.md, docs/performance.md). The filter is Lanczos, Pillow's sharpest antialiasing
    one: the train and eval transforms resample the stored image once more, so this step should lose
    as little as its size allows. ``reducing_gap=3`` lets a photo over 6× larger than S be box-averaged
    down by a whole factor first, leaving Lanczos at least 3× (by Pillow's measure indistinguishable
    from Lanczos alone), which keeps prepare fast on camera-sized originals. Pixels are resized as
    stored, and the EXIF orientation tag and the ICC profile are carried over, so any decoder treats
    the smaller image as it treats the original: ours (store/stream.py) ignores both, as before.
    Other modes are converted to RGB first, as that decoder converts them (alpha dropped, palette
    and CMYK resolved; their profile then no longer applies and is dropped); greyscale stays greyscale.
    Colour is kept at full resolution (4:4:4): the usual 4:2:0 halves it, which an image stored near
    the model's input size cannot spare (measured on the 128-px shapes stored at 37 px: 57.3 % zero-shot
    with 4:2:0, 60.3 % with 4:4:4, 60.2 % from the originals) and which saves little decoding time.
    """

    max_side: int
    jpeg_quality: int = JPEG_QUALITY

    @classmethod
    def from_options(cls, max_side, jpeg_quality) -> Shrink | None:
        """The checked options; None (copy every image) without --max-side."""
        if max_side is None:
            if jpeg_quality is not None:
                raise UserError(f"--jpeg-quality {jpeg_quality}: applies only with --max-side (without it every "
                                "image keeps its original bytes)")
            return None
        check_int("--max-side", max_side, 8, JPEG_MAX_SIDE)
        quality = JPEG_QUALITY if jpeg_quality is None else jpeg_quality
        check_int("--jpeg-quality", quality, 1, 100)
        return cls(int(max_side), int(quality))

    @property
    def options(self) -> list[str]:
        """The flags as the recorded command gives them, quality included so a changed default rebuilds alike."""
        return ["--max-side", str(self.max_side), "--jpeg-quality", str(self.jpeg_quality)]

    def __call__(self, ext: str, data: bytes, where: str, max_pixels: int = MAX_PIXELS) -> tuple[str, bytes]:
        """(ext, bytes) of one image as it is stored: unchanged up to max_side (only its header is read).
        ``where`` names the image in a ``BadImage``."""
        from PIL import Image

        width, height = read_header(data, where, max_pixels).size
        if max(width, height) <= self.max_side:
            return ext, data
        scale = self.max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        im = open_image(data, where, max_pixels, mode=None)
        pixels = im if im.mode in ("RGB", "L") else im.convert("RGB")
        kept = {"icc_profile": im.info.get("icc_profile") if pixels is im else None}
        orientation = im.getexif().get(ORIENTATION)
        if orientation is not None:
            exif = Image.Exif()
            exif[ORIENTATION] = orientation
            kept["exif"] = exif.tobytes()
        small = pixels.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=self.jpeg_quality, subsampling="4:4:4", optimize=True,
                   **{k: v for k, v in kept.items() if v is not None})
        return "jpg", buf.getvalue()


# ---------------------------------------------------------------- the writer shared by all sources
def write_dataset(out: str | Path, name: str, classnames: list[str], splits: dict[str, list[Spec]],
                  fingerprint: str, template: str = DEFAULT_TEMPLATE, shard_size: int = 1000,
                  skip_bad: bool = False, overwrite: bool = False, command: str | None = None,
                  shrink: Shrink | None = None, max_pixels: int = MAX_PIXELS, taxonomy: Taxonomy | None = None) -> Path:
    """Write ``splits`` as shards under ``out`` and dataset.json last. Resumes an interrupted run and
    rewrites shards that went missing or were damaged since (their sha256 differs from dataset.json's).

    ``command``: the `ballad-pipe prepare …` (less --out) that rebuilds the dataset; None for datasets
    written from Python (benchmarks), whose errors then name no command. ``shrink`` (--max-side) is
    folded in here, for every source alike: into the fingerprint (so a run with other settings finds
    "another dataset" and Phase A and the feature store see a changed one), the command and
    dataset.json. Without it, fingerprints stay those of datasets written before the option existed.
    A spec whose ``load`` (or ``shrink``, which decodes within ``max_pixels``) raises ``BadImage`` stops the
    run with its one line, or is left out and listed under ``skipped`` with ``skip_bad`` (--skip-bad).
    ``taxonomy`` (from ``--classes categories.json``) is recorded as it is and enters no fingerprint: it
    changes no image, label or prompt, only what an evaluation may report.
    """
    out = Path(out)
    extra = {"taxonomy": taxonomy} if taxonomy else {}
    if shrink is not None:
        fingerprint = _fingerprint(fingerprint, "max-side", shrink.max_side, shrink.jpeg_quality)
        command = command and f"{command} {shlex.join(shrink.options)}"
        extra |= {"max_side": shrink.max_side, "jpeg_quality": shrink.jpeg_quality}
    for split, specs in splits.items():
        if not specs:
            raise UserError(f"split '{split}' of {name} is empty")
        keys = collections.Counter(s.key for s in specs)
        twice = next((k for k, n in keys.items() if n > 1), None)
        if twice is not None:  # webdataset would merge the two into one sample
            raise UserError(f"split '{split}' of {name}: two images give the sample key '{twice}' (keys drop the "
                            "extension and turn dots into _); rename one")
    with exclusive_lock(out):
        _claim(out, fingerprint, overwrite)
        for stale in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
            stale.unlink()  # a shard or JSON write cut short by a kill; written again below
        recorded = _recorded_sha256(out)
        meta_splits = {split: _write_split(out, split, specs, len(classnames), shard_size, skip_bad, recorded, shrink,
                                           max_pixels)
                       for split, specs in splits.items()}
        _describe(out, name, classnames, template, fingerprint, command, meta_splits, **extra)
    return out


def _describe(out: Path, name: str, classnames: list[str], template: str, fingerprint: str, command: str | None,
              splits: dict, **extra) -> None:
    """dataset.json, written last (atomically): the directory is a dataset from then on. ``extra``: the
    fields only some runs write (index: label_key, indexed; --max-side: max_side, jpeg_quality; a
    categories.json: taxonomy)."""
    write_json(out / DATASET_FILE, {"name": name, "classnames": classnames, "template": template,
                                    "fingerprint": fingerprint, "command": command, **extra, "splits": splits})


def _claim(out: Path, fingerprint: str, overwrite: bool, keep_files: bool = False) -> None:
    """Refuse a directory that holds another dataset; mark it as ours before writing shards.

    ``--overwrite`` empties the directory first, unless ``keep_files`` (`prepare index`, whose --out may
    hold the very shards it describes): then only dataset.json is replaced.
    """
    for f in (out / DATASET_FILE, out / MARKER_FILE):
        if f.is_file():
            try:
                theirs = json.loads(f.read_text()).get("fingerprint")
            except json.JSONDecodeError:
                theirs = None
            if theirs != fingerprint:
                if not overwrite:
                    raise UserError(f"{out}: holds another dataset ({f.name} differs); "
                                    "choose another --out or pass --overwrite")
                if not keep_files:
                    shutil.rmtree(out)
                break
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER_FILE, {"fingerprint": fingerprint})


def _recorded_sha256(out: Path) -> dict[str, str]:
    """Shard → sha256 from the dataset.json of an earlier finished run of this dataset (``_claim``
    checked the fingerprint): a shard that no longer matches was damaged and is written again."""
    try:
        splits = json.loads((out / DATASET_FILE).read_text())["splits"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return {rel: sha for s in splits.values() for rel, sha in zip(s["shards"], s.get("shard_sha256") or [])}


def _write_split(out: Path, split: str, specs: list[Spec], num_classes: int, shard_size: int, skip_bad: bool,
                 recorded: dict[str, str], shrink: Shrink | None, max_pixels: int) -> dict:
    (out / split).mkdir(parents=True, exist_ok=True)
    counts = [0] * num_classes
    shards, sizes, hashes, skipped = [], [], [], []
    groups = [specs[i:i + shard_size] for i in range(0, len(specs), shard_size)]
    bar = progress(total=len(specs), desc=f"prepare {split}", unit="img")
    for idx, group in enumerate(groups):
        rel = f"{split}/{SHARD_PATTERN.format(idx)}"
        back = _read_back(out / rel, recorded.get(rel))
        if back is None:
            write_shard(out / rel, _materialise(group, skip_bad, shrink, max_pixels))
            back = _read_back(out / rel, None)
        kept, size, sha = back
        skipped += [s.key for s in group if s.key not in kept]
        for label in kept.values():
            counts[label] += 1
        shards.append(rel)
        sizes.append(size)
        hashes.append(sha)
        bar.update(len(group))
    bar.close()
    if skipped:
        log.warning("%s: skipped %d unreadable image(s): %s", split, len(skipped), ", ".join(skipped[:20]))
    if not sum(counts):
        raise UserError(f"split '{split}': no readable images left")
    return {"shards": shards, "shard_bytes": sizes, "shard_sha256": hashes, "num_samples": sum(counts),
            "class_counts": counts, "skipped": skipped}


def _read_back(path: Path, recorded_sha256: str | None) -> tuple[dict[str, int], int, str] | None:
    """(label by key, byte size, sha256) of a whole shard at ``path``; None when it must be written:
    missing, unreadable, or no longer the bytes an earlier run recorded."""
    if not path.is_file():
        return None
    sha = sha256_file(path)
    if recorded_sha256 not in (None, sha):
        log.warning("%s: damaged (its sha256 differs from %s's), writing it again", path, DATASET_FILE)
        return None
    try:
        kept = {s.key: s.label for s in read_shard(path)}
    except (tarfile.TarError, EOFError, ValueError) as e:
        log.warning("%s: unreadable (%s), writing it again", path, e.__class__.__name__)
        return None
    return kept, path.stat().st_size, sha


def _materialise(group: list[Spec], skip_bad: bool, shrink: Shrink | None, max_pixels: int):
    for spec in group:
        try:
            ext, data = spec.load()
            if shrink:
                ext, data = shrink(ext, data, spec.key, max_pixels)
        except BadImage as e:
            if not skip_bad:
                raise e.refusal() from None
            continue
        yield Sample(spec.key, ext, data, spec.label)


def _shuffled(specs: list[Spec], seed: int) -> list[Spec]:
    """Train samples in a seeded random order: split lists and CIFAR come sorted by class, and a
    shuffle buffer of a few thousand samples cannot mix shards that each hold one class."""
    return [specs[i] for i in np.random.default_rng(seed).permutation(len(specs))]


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- source 1: the generated shapes demo
def prepare_synthetic(out, imbalance: float = 100.0, seed: int = 0, max_count: int = 300, test_per_class: int = 20,
                      val_per_class: int = 10, image_size: int = 32, shard_size: int = 1000,
                      overwrite: bool = False, max_side: int | None = None, jpeg_quality: int | None = None) -> Path:
    """The long-tailed shapes demo: 30 (colour, shape) classes, exponential train counts, balanced val/test."""
    from stages import shapes

    _check_imbalance(imbalance)  # at most --max-count in effect: shapes.long_tailed_counts keeps one image per class
    check_int("--max-count", max_count, 1)
    check_int("--seed", seed, 0, SEED_MAX)
    check_int("--test-per-class", test_per_class, 1)
    check_int("--val-per-class", val_per_class, 1)
    # Below 8 px a triangle, a diamond and a circle are a few alike pixels; the shapes are drawn at 4× the size.
    check_int("--image-size", image_size, 8, 1024)
    check_int("--shard-size", shard_size, 1)
    shrink = Shrink.from_options(max_side, jpeg_quality)
    _check_out(out)
    names = shapes.classnames()
    rng = np.random.default_rng(seed)
    # Which class is the head is drawn per seed, so "red" is not always frequent.
    order = rng.permutation(len(names))
    counts = np.zeros(len(names), dtype=int)
    counts[order] = shapes.long_tailed_counts(len(names), max_count, imbalance)

    def specs(split: str, per_class) -> list[Spec]:
        labels = np.repeat(np.arange(len(names)), per_class)
        labels = labels[np.random.default_rng([seed, shapes.SPLIT_STREAM[split]]).permutation(len(labels))]
        return [Spec(f"{split}_{i:06d}", int(lab), _render_fn(int(lab), seed, split, i, image_size))
                for i, lab in enumerate(labels)]

    splits = {"train": specs("train", counts), "val": specs("val", val_per_class), "test": specs("test", test_per_class)}
    fp = _fingerprint("shapes", imbalance, seed, max_count, test_per_class, val_per_class, image_size, shard_size)
    cmd = _command("synthetic", imbalance=imbalance, seed=seed, max_count=max_count, test_per_class=test_per_class,
                   val_per_class=val_per_class, image_size=image_size, shard_size=shard_size)
    return write_dataset(out, "shapes-lt", names, splits, fp, shard_size=shard_size, overwrite=overwrite, command=cmd,
                         shrink=shrink)


def _render_fn(label, seed, split, index, size):
    from stages.shapes import render

    return lambda: ("png", render(label, seed, split, index, size))


# ---------------------------------------------------------------- source 2: ImageNet-LT / Places-LT lists
def parse_list(path: Path) -> list[tuple[str, int]]:
    """Lines ``relative/path.jpg <label>``; errors name the file and line."""
    if not path.is_file():
        raise UserError(f"{path}: list file not found")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: expected '<relative/path> <label>', got {line!r}")
        rel, label = parts
        try:
            label = int(label)
        except ValueError:
            raise UserError(f"{path}:{lineno}: label {label!r} is not an integer") from None
        if label < 0:
            raise UserError(f"{path}:{lineno}: label {label} is negative")
        entries.append((rel, label))
    if not entries:
        raise UserError(f"{path}: list is empty")
    return entries


def classnames_from_folders(entries, num_classes: int, list_path: Path) -> list[str]:
    """`train/airfield/00004851.jpg 0` → class 0 is "airfield" (underscores → spaces)."""
    names: dict[int, str] = {}
    for rel, label in entries:
        parent = Path(rel).parent.name
        if not parent:
            raise UserError(f"{list_path}: '{rel}' has no folder to name class {label}; pass --classes FILE")
        names.setdefault(label, parent.replace("_", " "))
    missing = [k for k in range(num_classes) if k not in names]
    if missing:
        raise UserError(f"{list_path}: no image names class {missing[0]}; pass --classes FILE")
    return [names[k] for k in range(num_classes)]


def load_classnames(classes: str) -> tuple[list[str], Taxonomy | None]:
    """The class names of a ``--classes`` value, label k = names[k], and their taxonomy where the file
    gives one: ``imagenet`` (CLIP's curated names), a text file (one name per line) or a ``.json`` file.
    JSON is there for iNaturalist, whose list folders are numbers (``train_val2018/Plantae/7477/…``) and
    whose species names ship as ``categories.json``: a list of objects with ``id`` and ``name``, ordered
    by id, and the levels of TAXONOMY_LEVELS that every object carries (``kingdom`` … ``genus``, kept for
    coarser-level scoring; other keys are ignored); a plain list of names is read too. Every problem is
    one line naming the file and the entry."""
    if classes == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), None
    path = Path(classes)
    if not path.is_file():
        raise UserError(f"--classes {classes}: file not found (or use --classes imagenet)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--classes {classes}: not a UTF-8 text file of class names, one per line") from None
    if path.suffix.lower() == ".json":
        names, taxonomy = _json_classnames(text, path)
    else:
        names, taxonomy = [line.strip() for line in text.splitlines() if line.strip()], None
    if not names:
        raise UserError(f"{path}: class file is empty")
    return names, taxonomy


# A name as the text form gives it: one line, no surrounding spaces (they would end up in every prompt).
CLASS_NAME = Field("text", test=(lambda name: bool(name) and name == name.strip(),
                                 "a non-empty one-line name without leading or trailing spaces"))
CATEGORY = {"id": Field("int", low=0), "name": CLASS_NAME,
            **{level: replace(CLASS_NAME, optional=True) for level in TAXONOMY_LEVELS}}


def _json_classnames(text: str, path: Path) -> tuple[list[str], Taxonomy | None]:
    """``load_classnames``'s JSON form. Objects must carry the ids 0..K-1, each once: an id is a label of
    the split lists, so a gap or a repeat would shift every name after it onto the wrong images."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    expected = "a JSON list of class names, or of objects with 'id' and 'name' (as iNaturalist's categories.json)"
    if not isinstance(doc, list):
        raise UserError(f"{path}: holds {show(doc)}; expected {expected}")
    if doc and isinstance(doc[0], str):
        for i, name in enumerate(doc):
            if not fits(name, CLASS_NAME):
                raise UserError(f"{path}: entry {i} is {show(name)}; expected {describe(CLASS_NAME)}")
        return doc, None
    by_id: dict[int, tuple[int, dict]] = {}
    for i, entry in enumerate(doc):
        entry = check(entry, CATEGORY, f"{path}: entry {i}")
        if entry["id"] in by_id:
            raise UserError(f"{path}: entry {i} has id {entry['id']}, as entry {by_id[entry['id']][0]} has")
        by_id[entry["id"]] = (i, entry)
    missing = next((k for k in range(len(doc)) if k not in by_id), None)
    if missing is not None:
        raise UserError(f"{path}: no entry has id {missing}, but {len(doc)} entries need the ids 0..{len(doc) - 1}")
    entries = [by_id[k][1] for k in range(len(doc))]
    taxonomy = {level: [e[level] for e in entries] for level in TAXONOMY_LEVELS if all(level in e for e in entries)}
    return [e["name"] for e in entries], taxonomy or None


KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; any other format as PNG


def _file_loader(path: Path, max_pixels: int):
    """A Spec's ``load`` for an image file: the file is decoded whole first (a ``BadImage`` otherwise), so a
    shard never holds an image the stages cannot read; then its bytes, or a PNG of it (KEPT_FORMATS)."""
    def load():
        data = read_file(path)
        image = open_image(data, str(path), max_pixels, mode=None)  # decoded once, in the mode it is stored
        ext = KEPT_FORMATS.get(image.format)
        return (ext, data) if ext else ("png", _png(np.asarray(image.convert("RGB"))))

    return load


def prepare_lists(out, root, train_list, test_list, val_list=None, classes=None, name=None, seed: int = 0,
                  shard_size: int = 1000, skip_bad: bool = False, overwrite: bool = False, max_side: int | None = None,
                  jpeg_quality: int | None = None, max_pixels: int = MAX_PIXELS) -> Path:
    root, shrink = _check_file_source(out, root, "image root directory", seed, shard_size, name, max_side, jpeg_quality,
                                      max_pixels)
    lists = {"train": Path(train_list), "test": Path(test_list)}
    if val_list:
        lists["val"] = Path(val_list)
    entries = {split: parse_list(p) for split, p in lists.items()}
    max_label = max(lab for es in entries.values() for _, lab in es)
    if classes:
        names, taxonomy = load_classnames(classes)
        if len(names) <= max_label:
            worst = next((p, i) for s, p in lists.items() for i, (_, lab) in enumerate(entries[s]) if lab == max_label)
            raise UserError(f"--classes {classes}: {len(names)} names but {worst[0]} uses label {max_label}")
    else:
        names, taxonomy = classnames_from_folders(entries["train"], max_label + 1, lists["train"]), None
    for split, es in entries.items():
        for rel, _ in es:
            if not (root / rel).is_file():
                raise UserError(f"{lists[split]}: image '{rel}' not found under {root}")
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in lists.values()]
    fp = _fingerprint("lists", str(root.resolve()), digests, names, seed, shard_size)
    cmd = _command("list", root=_absolute(root), train_list=_absolute(train_list), test_list=_absolute(test_list),
                   val_list=_absolute(val_list), classes=_classes_arg(classes), name=name, seed=seed,
                   shard_size=shard_size, skip_bad=skip_bad, max_pixels=max_pixels)
    return _write_files(out, root, entries, names, name or Path(train_list).stem.split("_")[0], fp, cmd, seed=seed,
                        shard_size=shard_size, skip_bad=skip_bad, max_pixels=max_pixels, overwrite=overwrite,
                        shrink=shrink, taxonomy=taxonomy)


def _classes_arg(classes: str | None) -> str | None:
    return classes if classes in (None, "imagenet") else _absolute(classes)


def _check_file_source(out, root, what: str, seed, shard_size, name, max_side, jpeg_quality,
                       max_pixels) -> tuple[Path, Shrink | None]:
    """The checks `list` and `folder` share, options first: (the image root, the --max-side settings)."""
    check_int("--seed", seed, 0, SEED_MAX)
    check_int("--shard-size", shard_size, 1)
    check_int("--max-pixels", max_pixels, 1)
    _check_name(name)
    shrink = Shrink.from_options(max_side, jpeg_quality)
    _check_out(out)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: {what} not found")
    return root, shrink


def _write_files(out, root: Path, entries: dict[str, list[tuple[str, int]]], names: list[str], name: str,
                 fingerprint: str, command: str, *, seed: int, shard_size: int, skip_bad: bool, max_pixels: int,
                 overwrite: bool, shrink: Shrink | None, taxonomy: Taxonomy | None) -> Path:
    """Image files under ``root``, per split as (relative path, label), → shards: what `list` and `folder`
    share. Files are copied byte for byte when JPEG/PNG/WebP (and not shrunk by --max-side); the train
    split is written in a seeded random order, the others in the order given."""
    splits = {split: [Spec(_key(rel), lab, _file_loader(root / rel, max_pixels)) for rel, lab in es]
              for split, es in entries.items()}
    splits["train"] = _shuffled(splits["train"], seed)
    return write_dataset(out, name, names, splits, fingerprint, shard_size=shard_size, skip_bad=skip_bad,
                         overwrite=overwrite, command=command, shrink=shrink, max_pixels=max_pixels, taxonomy=taxonomy)


def _key(rel: str) -> str:
    """A webdataset key: the path without extension, with no dots (webdataset splits at the first dot)."""
    stem = str(Path(rel).with_suffix(""))
    return stem.replace(".", "_")


# ---------------------------------------------------------------- source 3: image folders (torchvision's ImageFolder)
# torchvision.datasets.folder.IMG_EXTENSIONS (not imported: prepare runs without torch)
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_TEST_FRACTION = 0.2  # of each class, when ROOT has no test/ folder


def prepare_folder(out, root, val_fraction: float | None = None, test_fraction: float | None = None, seed: int = 0,
                   classes: str | None = None, name: str | None = None, shard_size: int = 1000, skip_bad: bool = False,
                   overwrite: bool = False, max_side: int | None = None, jpeg_quality: int | None = None,
                   max_pixels: int = MAX_PIXELS) -> Path:
    """torchvision's ImageFolder layout → shards, through the same (path, label) lists as `list`.

    ``ROOT/<class>/…`` (images found recursively, as ImageFolder does; hidden files skipped) is split
    per class: a seeded shuffle of the class's files, the first round(f·n) to test, the next to val,
    the rest to train, so every class keeps its proportions and adding a class moves no other class's
    images. ``ROOT/train/<class>/…`` + ``ROOT/test/<class>/…`` (+ ``ROOT/val/…``) keeps the split it
    has; --val-fraction then draws val from train/ when there is no val/ folder. Labels are the sorted
    class folders of the train images; names are the folder names (underscores → spaces) or
    ``classes`` (a file in that order, or `imagenet` for the 1,000 ImageNet folders, sorted by WordNet id).
    """
    _check_fraction("--val-fraction", val_fraction)
    _check_fraction("--test-fraction", test_fraction)
    if (val_fraction or 0) + (test_fraction or 0) >= 1:
        raise UserError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction}: must add up to below 1 "
                        "(train keeps the rest)")
    root, shrink = _check_file_source(out, root, "image folder", seed, shard_size, name, max_side, jpeg_quality,
                                      max_pixels)
    given = {split: root / split for split in ("train", "val", "test") if (root / split).is_dir()}
    if "train" in given and "test" in given:
        source = given.pop("train")
        if test_fraction:
            raise UserError(f"--test-fraction {test_fraction}: {root} has a test/ folder, which is the test split")
    elif "train" in given and "val" in given:  # a split layout without test/: the flat reading would make "train" a class
        raise UserError(f"--root {root}: has train/ and val/ but no test/ folder; add test/<class>/ folders, or put "
                        "the class folders directly under the root to split them by --test-fraction")
    else:
        source, given = root, {}
    if val_fraction and "val" in given:
        raise UserError(f"--val-fraction {val_fraction}: {root} has a val/ folder, which is the val split")
    folders = _class_folders(source)
    if classes:
        names, taxonomy = load_classnames(classes)
        if len(names) != len(folders):
            raise UserError(f"--classes {classes}: {len(names)} names for the {len(folders)} class folders of {source}")
    else:
        names, taxonomy = [f.replace("_", " ") for f in folders], None
    fractions = {"test": DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction, "val": val_fraction or 0}
    fractions = {split: f for split, f in fractions.items() if split not in given and f > 0}
    entries: dict[str, list[tuple[str, int]]] = {"train": [], **{split: [] for split in (*given, *fractions)}}
    for label, folder in enumerate(folders):
        files = _images(source / folder, root)
        drawn = _stratified(files, fractions, seed, label, source / folder)
        for split, rels in drawn.items():
            entries[split] += [(rel, label) for rel in rels]
    for split, path in given.items():
        extra = sorted(set(_class_folders(path)) - set(folders))
        if extra:
            raise UserError(f"{path / extra[0]}: class folder not in {source}")
        for label, folder in enumerate(folders):
            if (path / folder).is_dir():
                entries[split] += [(rel, label) for rel in _images(path / folder, root)]
    entries = {split: entries[split] for split in ("train", "val", "test") if entries.get(split)}
    fp = _fingerprint("folder", str(root.resolve()), entries, names, seed, shard_size)
    cmd = _command("folder", root=_absolute(root), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                   classes=_classes_arg(classes), name=name, shard_size=shard_size, skip_bad=skip_bad,
                   max_pixels=max_pixels)
    return _write_files(out, root, entries, names, name or root.resolve().name, fp, cmd, seed=seed,
                        shard_size=shard_size, skip_bad=skip_bad, max_pixels=max_pixels, overwrite=overwrite,
                        shrink=shrink, taxonomy=taxonomy)


def _class_folders(path: Path) -> list[str]:
    folders = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise UserError(f"{path}: no class folders (expected ROOT/<class>/*.jpg, or ROOT/train/<class>/… and "
                        "ROOT/test/<class>/…)")
    return folders


def _images(folder: Path, root: Path) -> list[str]:
    """Image files under ``folder`` (recursively, following links as ImageFolder does), as sorted paths
    relative to ``root``; an empty class folder is refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in FOLDER_SUFFIXES]
    if not found:
        raise UserError(f"{folder}: class folder holds no images ({', '.join(FOLDER_SUFFIXES)})")
    return sorted(Path(f).relative_to(root).as_posix() for f in found)


def _stratified(files: list[str], fractions: dict[str, float], seed: int, label: int, folder: Path) -> dict[str, list[str]]:
    """One class's files → {split: sorted files}: a shuffle seeded by (seed, label), then round(f·n) files
    per drawn split (test first, then val) and the rest to train, which must keep at least one."""
    order = np.random.default_rng([seed, label]).permutation(len(files))
    drawn, at = {}, 0
    for split, f in fractions.items():
        n = math.floor(f * len(files) + 0.5)
        drawn[split] = sorted(files[i] for i in order[at:at + n])
        at += n
    if at >= len(files):
        given = " ".join(f"--{split}-fraction {f}" for split, f in fractions.items())
        raise UserError(f"{folder}: its {len(files)} image(s) leave none for train with {given}; "
                        "lower the fraction or add images")
    return {"train": sorted(files[i] for i in order[at:]), **drawn}


# ---------------------------------------------------------------- source 4: CIFAR-100-LT
def cifar_lt_counts(imbalance: float, num_classes: int = 100, max_count: int = 500) -> list[int]:
    """n_i = ⌊500 · ρ^(−i/99)⌋, as in LDAM-DRW and BALLAD (10,847 images at ρ = 100)."""
    return [int(max_count * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR archive's pickles hold dicts, lists, bytes and numpy arrays; an unpickler that builds
    nothing else, so that an archive someone else made cannot run code when opened (plain pickle calls
    any importable function the file names)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(tar: tarfile.TarFile, member: str, archive: Path, keys: tuple[bytes, ...]) -> dict:
    """One pickled dict of the archive, with ``keys``; a one-line UserError for anything else."""
    try:
        obj = _ArraysOnly(tar.extractfile(member), encoding="bytes").load()
    except KeyError:
        raise UserError(f"{archive}: no '{member}' inside; expected the official cifar-100-python.tar.gz") from None
    except Exception as e:  # any unpickling failure (refused class, truncated or garbled data) means the same
        raise UserError(f"{archive}: '{member}' is not a CIFAR pickle ({e.__class__.__name__}: {e})") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"{archive}: '{member}' has no {missing[0].decode()!r}; expected the official "
                        "cifar-100-python.tar.gz")
    return obj


def _cifar_split(d: dict, member: str, archive: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N]) of a train or test dict, checked against each other."""
    data, labels = np.asarray(d[b"data"]), np.asarray(d[b"fine_labels"])
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),)
            or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and not 0 <= labels.min() <= labels.max()
                                                               < num_classes)):
        raise UserError(f"{archive}: '{member}' does not hold N × 3072 uint8 images with N labels below "
                        f"{num_classes}; expected the official cifar-100-python.tar.gz")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def prepare_cifar100_lt(out, archive, imbalance: float = 100.0, seed: int = 0, shard_size: int = 1000,
                        overwrite: bool = False, max_side: int | None = None, jpeg_quality: int | None = None) -> Path:
    """CIFAR-100-LT: per class, a seeded shuffle of its train images then the first n_i (LDAM's recipe)."""
    _check_imbalance(imbalance, 500, "the largest class has 500 images; a larger ratio leaves the smallest none")
    check_int("--seed", seed, 0, SEED_MAX)
    check_int("--shard-size", shard_size, 1)
    shrink = Shrink.from_options(max_side, jpeg_quality)
    _check_out(out)
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"--archive {archive}: file not found")
    try:
        with tarfile.open(archive, "r:*") as tar:
            meta = _read_pickle(tar, "cifar-100-python/meta", archive, (b"fine_label_names",))
            raw = {split: _read_pickle(tar, f"cifar-100-python/{split}", archive, (b"data", b"fine_labels"))
                   for split in ("train", "test")}
    except (tarfile.TarError, EOFError, OSError) as e:  # OSError: a gzip stream cut short or garbled
        raise UserError(f"{archive}: not a readable tar archive ({e.__class__.__name__}: {e})") from None
    names = meta[b"fine_label_names"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, bytes) and n.strip() for n in names):
        raise UserError(f"{archive}: 'cifar-100-python/meta' has no list of class names (at least 2)")
    names = [n.decode("utf-8", "replace").replace("_", " ") for n in names]
    train, test = (_cifar_split(raw[split], f"cifar-100-python/{split}", archive, len(names)) for split in ("train", "test"))
    rng = np.random.RandomState(seed)  # same stream as LDAM's np.random.seed + np.random.shuffle
    keep = []
    for cls, n in enumerate(cifar_lt_counts(imbalance, len(names))):
        idx = np.where(train[1] == cls)[0]
        rng.shuffle(idx)
        keep.extend(idx[:n].tolist())

    def specs(split_arrays, indices, split):
        data, labels = split_arrays
        return [Spec(f"{split}_{i:05d}", int(labels[i]), (lambda a=data[i]: ("png", _png(a)))) for i in indices]

    splits = {"train": _shuffled(specs(train, keep, "train"), seed), "test": specs(test, range(len(test[1])), "test")}
    fp = _fingerprint("cifar100-lt", imbalance, seed, shard_size, hashlib.sha256(archive.read_bytes()).hexdigest())
    cmd = _command("cifar100-lt", archive=_absolute(archive), imbalance=imbalance, seed=seed, shard_size=shard_size)
    return write_dataset(out, f"cifar100-lt-r{imbalance:g}", names, splits, fp, shard_size=shard_size,
                         overwrite=overwrite, command=cmd, shrink=shrink)


# ---------------------------------------------------------------- source 5: existing webdataset shards, described in place
def prepare_index(out, shards, classes: str, label_key: str = "cls", name: str | None = None, workers: int = 4,
                  overwrite: bool = False) -> Path:
    """Describe existing webdataset shards in ``out``/dataset.json without copying them.

    ``shards``: ``SPLIT=PATTERN`` strings. A pattern is expanded as webdataset expands it (braces:
    ``data-{000000..000146}.tar``) into local paths (which may also hold ``*``/``?`` globs), URLs
    (``http(s)://``, ``s3://``, ``gs://``, … read through fsspec) or ``pipe:CMD`` commands, which run here
    because the user typed them on this command line (readers of the description need --allow-commands;
    store/trust.py). Every shard is read
    once, through webdataset's own tar reader and sample grouping, so the counts are what the stages
    will stream: each sample needs an image member (IMAGE_EXTS) and a ``label_key`` label within
    ``classes``; image bytes are not decoded (the stages stop at an undecodable one, or skip it with --skip-bad).
    Local shards are listed by absolute path (relative when under ``out``, so that the directory moves
    and serves whole) with their byte size and sha256, which readers compare as for our own shards;
    URLs are listed as given, without sizes. The fingerprint covers every shard's sha256, remote ones
    too, so Phase A's --resume and the feature store notice a re-indexed dataset whose bytes changed.
    """
    key = LabelKey.parse(label_key, "--label-key")
    _check_name(name)
    check_int("--workers", workers, 1, 64)
    out = _check_out(out)
    patterns = _split_patterns(shards)
    names, taxonomy = load_classnames(classes)
    urls = {split: _expand(split, pattern) for split, pattern in patterns.items()}
    with exclusive_lock(out):
        splits, hashes = {}, {}
        for split, us in urls.items():
            scans = _scan_split(split, us, key, names, classes, workers)
            entries = [_shard_entry(u, out) for u in us]
            local = [local_path(u) is not None for u in us]
            counts = [sum(c) for c in zip(*(s.counts for s in scans))]
            if not sum(counts):
                raise UserError(f"--shards {split}={patterns[split]}: its shards hold no samples")
            exts = sum((s.image_exts for s in scans), collections.Counter())
            splits[split] = {"shards": entries, "shard_bytes": [s.size if lo else None for s, lo in zip(scans, local)],
                             "shard_sha256": [s.sha256 if lo else None for s, lo in zip(scans, local)],
                             "num_samples": sum(counts), "class_counts": counts, "skipped": [],
                             "image_exts": dict(sorted(exts.items()))}
            hashes[split] = [(e, s.sha256) for e, s in zip(entries, scans)]
        fp = _fingerprint("index", str(key), names, hashes)
        cmd = _command("index", shards=[f"{s}={_absolute_pattern(p)}" for s, p in patterns.items()],
                       classes=_classes_arg(classes), label_key=str(key), name=name)
        _claim(out, fp, overwrite, keep_files=True)
        _describe(out, name or out.absolute().name, names, DEFAULT_TEMPLATE, fp, cmd, splits, label_key=str(key),
                  indexed=True, **({"taxonomy": taxonomy} if taxonomy else {}))
    return out


def _split_patterns(shards) -> dict[str, str]:
    example = "e.g. --shards train=data/train-{000000..000009}.tar"
    if not shards:
        raise UserError(f"--shards: give at least one SPLIT=PATTERN, {example}")
    patterns = {}
    for item in [shards] if isinstance(shards, str) else shards:
        split, sep, pattern = item.partition("=")
        if not sep or not pattern or not SPLIT_NAME.fullmatch(split):
            raise UserError(f"--shards {item}: expected SPLIT=PATTERN (SPLIT: letters, digits, _ and -), {example}")
        if split in RESERVED_SPLITS:
            raise UserError(f"--shards {item}: '{split}' cannot name a split (the feature store uses it)")
        if split in patterns:
            raise UserError(f"--shards {item}: split '{split}' is given twice")
        patterns[split] = pattern
    return patterns


def _expand(split: str, pattern: str) -> list[str]:
    """A --shards pattern → shard URLs: braces expanded (braceexpand, as webdataset does), then local
    entries checked to exist (globs expanded, sorted) and made absolute; URLs as they are."""
    import braceexpand

    option = f"--shards {split}={pattern}"
    try:
        expanded = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError as e:
        raise UserError(f"{option}: {e}") from None
    urls, missing = [], []
    for entry in expanded:
        path = local_path(entry)
        if path is None:
            urls.append(entry)
        elif re.search(r"[*?[]", str(path)):
            urls += [os.path.abspath(p) for p in sorted(glob.glob(str(path))) if os.path.isfile(p)]
        elif path.is_file():
            urls.append(os.path.abspath(path))
        else:
            missing.append(entry)
    if not urls:
        raise UserError(f"{option}: matches no file")
    if missing:
        raise UserError(f"{option}: {missing[0]} not found ({len(missing)} of the {len(expanded)} shards it names)")
    twice = next((u for u, n in collections.Counter(urls).items() if n > 1), None)
    if twice is not None:
        raise UserError(f"{option}: names {twice} twice")
    return urls


def _absolute_pattern(pattern: str) -> str:
    """A local pattern made absolute for the recorded command (braces and globs kept); URLs as they are."""
    return pattern if has_scheme(pattern) else str(Path(pattern).absolute())


def _shard_entry(url: str, out: Path) -> str:
    """How dataset.json lists a shard: URLs as given; local files relative to ``out`` when under it, else absolute."""
    if local_path(url) is None:
        return url
    rel = Path(os.path.relpath(url, os.path.abspath(out)))
    return url if rel.parts[0] == ".." else rel.as_posix()


@dataclass(frozen=True)
class _Scan:
    counts: list[int]
    image_exts: collections.Counter
    size: int
    sha256: str


def _scan_split(split: str, urls: list[str], key: LabelKey, names: list[str], classes: str, workers: int) -> list[_Scan]:
    """Scan ``urls`` with ``workers`` threads (reading is I/O: a file, curl or a command); the first failing
    shard in order stops the run, with shards not yet started cancelled."""
    bar = progress(total=len(urls), desc=f"index {split}", unit="shard")
    with bar, concurrent.futures.ThreadPoolExecutor(min(workers, len(urls))) as pool:
        futures = [pool.submit(_scan_shard, url, key, len(names), classes) for url in urls]
        try:
            scans = []
            for f in futures:
                scans.append(f.result())
                bar.update()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return scans


class _HashingReader:
    """What a tar reader takes from a shard, hashed and counted on the way, so that its one scan also
    gives the shard's sha256 and size; ``drain`` reads the rest (the padding after the end-of-archive)."""

    def __init__(self, raw, url: str):
        self.raw, self.url, self.size, self.hash = raw, url, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def __str__(self) -> str:  # webdataset names the stream in its error messages
        return self.url


def _scan_shard(url: str, key: LabelKey, num_classes: int, classes: str) -> _Scan:
    from webdataset import tariterators

    counts, exts = [0] * num_classes, collections.Counter()
    try:
        # the user typed these patterns on this command line: their pipe: commands run (store/trust.py)
        with open_shard(url, commands=True) as raw:
            stream = _HashingReader(raw, url)
            for sample in tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": stream}])):
                label, ext = _indexed_sample(sample, url, key, num_classes, classes)
                counts[label] += 1
                exts[ext] += 1
            stream.drain()
    except UserError:
        raise
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:  # a command's exit status is an OSError
        what = e.args[0] if e.args else e  # webdataset appends the stream and URL to the arguments
        how = "cannot be read" if isinstance(e, OSError) and not isinstance(e, tarfile.TarError) else "unreadable shard"
        raise UserError(f"{url}: {how} ({e.__class__.__name__}: {' '.join(str(what).split())[:200]})") from None
    return _Scan(counts, exts, stream.size, stream.hash.hexdigest())


def _indexed_sample(sample: dict, url: str, key: LabelKey, num_classes: int, classes: str) -> tuple[int, str]:
    """(label, image member type) of one sample as webdataset streams it, or a one-line error naming it."""
    where = f"{url}: sample '{sample['__key__']}'"
    members = ", ".join(sorted(m for m in sample if not m.startswith("__")))
    image = next((e for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise UserError(f"{where} has no image member ({', '.join(IMAGE_EXTS)}); it has: {members}")
    if key.member not in sample:
        raise UserError(f"{where} has no .{key.member} member for --label-key {key}; it has: {members}")
    try:
        label = key.decode(sample[key.member])
    except ValueError as e:
        raise UserError(f"{where}: unreadable label for --label-key {key} ({e})") from None
    if not 0 <= label < num_classes:
        raise UserError(f"{where} has label {label}, outside the {num_classes} classes of --classes {classes}")
    return label, image
