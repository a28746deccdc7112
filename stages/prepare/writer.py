"""The one writer of `prepare`: lazy sample specs → webdataset shards + dataset.json (store/shards.py).

Every source turns its input into ``Spec``s first, so re-running after an interruption skips complete
shards without generating, reading or decoding anything for them. The writer holds the output's lock
(pipeline/locks.py) for the whole run, so two runs never interleave their shards, and writes
dataset.json last: the directory is a dataset from then on. `prepare index`, which writes no shards,
claims and describes its directory through ``claim`` and ``describe`` here too. Images keep their
bytes unless ``--max-side`` asks for smaller shards (``Shrink``).
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS, BadImage, open_image, read_header
from pipeline.locks import exclusive_lock
from pipeline.options import check_int
from pipeline.runtime import progress, sha256_file, write_json
from store.shards import DATASET_FILE, MARKER_FILE, SHARD_PATTERN, Sample, Taxonomy, read_shard, write_shard

log = logging.getLogger("ballad.prepare")


@dataclass(frozen=True)
class Spec:
    """A sample not yet materialised: ``load()`` returns (ext, image bytes)."""

    key: str
    label: int
    load: Callable[[], tuple[str, bytes]]


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


# ---------------------------------------------------------------- the dataset: shards, then dataset.json
def write_dataset(out: str | Path, name: str, classnames: list[str], splits: dict[str, list[Spec]],
                  fingerprint: str, template: str | None = None, shard_size: int = 1000,
                  skip_bad: bool = False, overwrite: bool = False, command: str | None = None,
                  shrink: Shrink | None = None, max_pixels: int = MAX_PIXELS, taxonomy: Taxonomy | None = None) -> Path:
    """Write ``splits`` as shards under ``out`` and dataset.json last. Resumes an interrupted run and
    rewrites shards that went missing or were damaged since (their sha256 differs from dataset.json's).

    ``template``: the prompt template, default pipeline/text.py's. ``command``: the `ballad-pipe prepare …`
    (less --out) that rebuilds the dataset (stages/prepare/common.py ``rebuild_command``); None for
    datasets written from Python (benchmarks), whose errors then name no command. ``shrink``
    (--max-side) is folded in here, for every source alike: into the fingerprint (so a run with other
    settings finds "another dataset" and Phase A and the feature store see a changed one) and
    dataset.json. Without it, fingerprints stay those of datasets written before the option existed.
    A spec whose ``load`` (or ``shrink``, which decodes within ``max_pixels``) raises ``BadImage`` stops the
    run with its one line, or is left out and listed under ``skipped`` with ``skip_bad`` (--skip-bad).
    ``taxonomy`` (from ``--classes categories.json``) is recorded as it is and enters no fingerprint: it
    changes no image, label or prompt, only what an evaluation may report.
    """
    out = Path(out)
    extra = {"taxonomy": taxonomy} if taxonomy else {}
    if shrink is not None:
        fingerprint = make_fingerprint(fingerprint, "max-side", shrink.max_side, shrink.jpeg_quality)
        extra |= {"max_side": shrink.max_side, "jpeg_quality": shrink.jpeg_quality}
    for split, specs in splits.items():
        _check_split(name, split, specs)
    with exclusive_lock(out):
        claim(out, fingerprint, overwrite)
        for stale in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
            stale.unlink()  # a shard or JSON write cut short by a kill; written again below
        recorded = _recorded_sha256(out)
        meta_splits = {split: _write_split(out, split, specs, len(classnames), shard_size, skip_bad, recorded, shrink,
                                           max_pixels)
                       for split, specs in splits.items()}
        describe(out, name, classnames, template, fingerprint, command, meta_splits, **extra)
    return out


def _check_split(name: str, split: str, specs: list[Spec]) -> None:
    if not specs:
        raise UserError(f"split '{split}' of {name} is empty")
    keys = collections.Counter(s.key for s in specs)
    twice = next((k for k, n in keys.items() if n > 1), None)
    if twice is not None:  # webdataset would merge the two into one sample
        raise UserError(f"split '{split}' of {name}: two images give the sample key '{twice}' (keys drop the "
                        "extension and turn dots into _); rename one")


def describe(out: Path, name: str, classnames: list[str], template: str | None, fingerprint: str, command: str | None,
             splits: dict, **extra) -> None:
    """dataset.json, written last (atomically): the directory is a dataset from then on. ``template``
    None: pipeline/text.py's default. ``extra``: the fields only some runs write (index: label_key,
    indexed; --max-side: max_side, jpeg_quality; a categories.json: taxonomy)."""
    if template is None:
        from pipeline.text import DEFAULT_TEMPLATE  # imported here: pipeline.text imports torch

        template = DEFAULT_TEMPLATE
    write_json(out / DATASET_FILE, {"name": name, "classnames": classnames, "template": template,
                                    "fingerprint": fingerprint, "command": command, **extra, "splits": splits})


def claim(out: Path, fingerprint: str, overwrite: bool, keep_files: bool = False) -> None:
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
    """Shard → sha256 from the dataset.json of an earlier finished run of this dataset (``claim``
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


# ---------------------------------------------------------------- what the sources share on the way to specs
def shuffled(specs: list[Spec], seed: int) -> list[Spec]:
    """Train samples in a seeded random order: split lists and CIFAR come sorted by class, and a
    shuffle buffer of a few thousand samples cannot mix shards that each hold one class."""
    return [specs[i] for i in np.random.default_rng(seed).permutation(len(specs))]


def make_fingerprint(*parts) -> str:
    """A dataset's identity: what its source, options and inputs were (dataset.json's ``fingerprint``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def png(array: np.ndarray) -> bytes:
    """An image array as PNG bytes (what the generated sources store)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
