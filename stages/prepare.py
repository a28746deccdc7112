"""Stage `prepare`: long-tailed datasets → webdataset shards (see store/shards.py for the format).

Three sources share one writer: the generated shapes demo, ImageNet-LT / Places-LT style split lists
(`relative/path.jpg <label>` per line) and CIFAR-100-LT cut from the official python archive. Every
source is turned into lazy sample specs first, so re-running after an interruption skips complete
shards without generating, reading or decoding anything for them. Every option is checked before
anything is read or written, and the writer holds the output's lock (pipeline/locks.py) for the
whole run, so two runs never interleave their shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import numbers
import pickle
import shlex
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import UserError
from pipeline.locks import exclusive_lock
from pipeline.runtime import progress, sha256_file, write_json
from pipeline.text import DEFAULT_TEMPLATE
from store.shards import DATASET_FILE, MARKER_FILE, SHARD_PATTERN, Sample, read_shard, write_shard

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
def _check_int(option: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"from {low} to {high}"
        raise UserError(f"{option} {value}: must be an integer {span}")


def _check_imbalance(value, highest: float = math.inf, why: str = "") -> None:
    """ρ = n_max / n_min: finite, at least 1, and at most ``highest`` where a larger one would empty a class."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and 1 <= value <= highest):
        span = "at least 1" if highest == math.inf else f"from 1 to {highest} ({why})"
        raise UserError(f"--imbalance {value}: must be a finite ratio n_max / n_min {span}")


def _command(source: str, **options) -> str:
    """``ballad-pipe prepare SOURCE --option value …`` without --out: dataset.json records it so that an
    error about a missing or damaged shard can name the command that rebuilds it (store.shards)."""
    args = ["ballad-pipe", "prepare", source]
    for name, value in options.items():
        if value is not None and value is not False:
            args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(args)


def _absolute(path) -> str | None:
    """Input paths as the recorded command names them: absolute, so it works from any directory."""
    return None if path is None else str(Path(path).absolute())


# ---------------------------------------------------------------- the writer shared by all sources
def write_dataset(out: str | Path, name: str, classnames: list[str], splits: dict[str, list[Spec]],
                  fingerprint: str, template: str = DEFAULT_TEMPLATE, shard_size: int = 1000,
                  skip_bad: bool = False, overwrite: bool = False, command: str | None = None) -> Path:
    """Write ``splits`` as shards under ``out`` and dataset.json last. Resumes an interrupted run and
    rewrites shards that went missing or were damaged since (their sha256 differs from dataset.json's).

    ``command``: the `ballad-pipe prepare …` (less --out) that rebuilds the dataset; None for datasets
    written from Python (benchmarks), whose errors then name no command.
    """
    out = Path(out)
    for split, specs in splits.items():
        if not specs:
            raise UserError(f"split '{split}' of {name} is empty")
    with exclusive_lock(out):
        _claim(out, fingerprint, overwrite)
        for stale in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
            stale.unlink()  # a shard or JSON write cut short by a kill; written again below
        recorded = _recorded_sha256(out)
        meta_splits = {split: _write_split(out, split, specs, len(classnames), shard_size, skip_bad, recorded)
                       for split, specs in splits.items()}
        write_json(out / DATASET_FILE, {"name": name, "classnames": classnames, "template": template,
                                        "fingerprint": fingerprint, "command": command, "splits": meta_splits})
    return out


def _claim(out: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse a directory that holds another dataset; mark it as ours before writing shards."""
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
                 recorded: dict[str, str]) -> dict:
    (out / split).mkdir(parents=True, exist_ok=True)
    counts = [0] * num_classes
    shards, sizes, hashes, skipped = [], [], [], []
    groups = [specs[i:i + shard_size] for i in range(0, len(specs), shard_size)]
    bar = progress(total=len(specs), desc=f"prepare {split}", unit="img")
    for idx, group in enumerate(groups):
        rel = f"{split}/{SHARD_PATTERN.format(idx)}"
        back = _read_back(out / rel, recorded.get(rel))
        if back is None:
            write_shard(out / rel, _materialise(group, skip_bad))
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


def _materialise(group: list[Spec], skip_bad: bool):
    for spec in group:
        try:
            ext, data = spec.load()
        except UnreadableImage as e:
            if not skip_bad:
                raise UserError(f"{e} (pass --skip-bad to skip unreadable images)") from None
            continue
        yield Sample(spec.key, ext, data, spec.label)


class UnreadableImage(Exception):
    pass


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
                      overwrite: bool = False) -> Path:
    """The long-tailed shapes demo: 30 (colour, shape) classes, exponential train counts, balanced val/test."""
    from stages import shapes

    _check_imbalance(imbalance)  # at most --max-count in effect: shapes.long_tailed_counts keeps one image per class
    _check_int("--max-count", max_count, 1)
    _check_int("--seed", seed, 0, SEED_MAX)
    _check_int("--test-per-class", test_per_class, 1)
    _check_int("--val-per-class", val_per_class, 1)
    # Below 8 px a triangle, a diamond and a circle are a few alike pixels; the shapes are drawn at 4× the size.
    _check_int("--image-size", image_size, 8, 1024)
    _check_int("--shard-size", shard_size, 1)
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
    return write_dataset(out, "shapes-lt", names, splits, fp, shard_size=shard_size, overwrite=overwrite, command=cmd)


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


def load_classnames(classes: str) -> list[str]:
    if classes == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    path = Path(classes)
    if not path.is_file():
        raise UserError(f"--classes {classes}: file not found (or use --classes imagenet)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path}: class file is empty")
    return names


def _file_loader(path: Path):
    def load():
        from PIL import Image, UnidentifiedImageError

        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").upper()
                im.load()
                if fmt in ("JPEG", "PNG", "WEBP"):
                    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt], data
                return "png", _png(np.asarray(im.convert("RGB")))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise UnreadableImage(f"{path}: unreadable image ({e.__class__.__name__})") from None

    return load


def prepare_lists(out, root, train_list, test_list, val_list=None, classes=None, name=None, seed: int = 0,
                  shard_size: int = 1000, skip_bad: bool = False, overwrite: bool = False) -> Path:
    _check_int("--seed", seed, 0, SEED_MAX)
    _check_int("--shard-size", shard_size, 1)
    if name is not None and (not name.strip() or "\n" in name):
        raise UserError(f"--name {name!r}: must be a non-empty single line")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: image root directory not found")
    lists = {"train": Path(train_list), "test": Path(test_list)}
    if val_list:
        lists["val"] = Path(val_list)
    entries = {split: parse_list(p) for split, p in lists.items()}
    max_label = max(lab for es in entries.values() for _, lab in es)
    if classes:
        names = load_classnames(classes)
        if len(names) <= max_label:
            worst = next((p, i) for s, p in lists.items() for i, (_, lab) in enumerate(entries[s]) if lab == max_label)
            raise UserError(f"--classes {classes}: {len(names)} names but {worst[0]} uses label {max_label}")
    else:
        names = classnames_from_folders(entries["train"], max_label + 1, lists["train"])
    splits = {}
    for split, es in entries.items():
        for rel, _ in es:
            if not (root / rel).is_file():
                raise UserError(f"{lists[split]}: image '{rel}' not found under {root}")
        splits[split] = [Spec(_key(rel), lab, _file_loader(root / rel)) for rel, lab in es]
    splits["train"] = _shuffled(splits["train"], seed)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in lists.values()]
    fp = _fingerprint("lists", str(root.resolve()), digests, names, seed, shard_size)
    cmd = _command("list", root=_absolute(root), train_list=_absolute(train_list), test_list=_absolute(test_list),
                   val_list=_absolute(val_list), classes=classes if classes in (None, "imagenet") else _absolute(classes),
                   name=name, seed=seed, shard_size=shard_size, skip_bad=skip_bad)
    return write_dataset(out, name or Path(train_list).stem.split("_")[0], names, splits, fp,
                         shard_size=shard_size, skip_bad=skip_bad, overwrite=overwrite, command=cmd)


def _key(rel: str) -> str:
    """A webdataset key: the path without extension, with no dots (webdataset splits at the first dot)."""
    stem = str(Path(rel).with_suffix(""))
    return stem.replace(".", "_")


# ---------------------------------------------------------------- source 3: CIFAR-100-LT
def cifar_lt_counts(imbalance: float, num_classes: int = 100, max_count: int = 500) -> list[int]:
    """n_i = ⌊500 · ρ^(−i/99)⌋, as in LDAM-DRW and BALLAD (10,847 images at ρ = 100)."""
    return [int(max_count * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


def _read_pickle(tar: tarfile.TarFile, member: str, archive: Path):
    try:
        return pickle.load(tar.extractfile(member), encoding="bytes")
    except KeyError:
        raise UserError(f"{archive}: no '{member}' inside; expected the official cifar-100-python.tar.gz") from None


def prepare_cifar100_lt(out, archive, imbalance: float = 100.0, seed: int = 0, shard_size: int = 1000,
                        overwrite: bool = False) -> Path:
    """CIFAR-100-LT: per class, a seeded shuffle of its train images then the first n_i (LDAM's recipe)."""
    _check_imbalance(imbalance, 500, "the largest class has 500 images; a larger ratio leaves the smallest none")
    _check_int("--seed", seed, 0, SEED_MAX)
    _check_int("--shard-size", shard_size, 1)
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"--archive {archive}: file not found")
    try:
        with tarfile.open(archive, "r:*") as tar:
            train = _read_pickle(tar, "cifar-100-python/train", archive)
            test = _read_pickle(tar, "cifar-100-python/test", archive)
            meta = _read_pickle(tar, "cifar-100-python/meta", archive)
    except tarfile.TarError as e:
        raise UserError(f"{archive}: not a readable tar archive ({e})") from None
    names = [n.decode().replace("_", " ") for n in meta[b"fine_label_names"]]
    rng = np.random.RandomState(seed)  # same stream as LDAM's np.random.seed + np.random.shuffle
    targets = np.asarray(train[b"fine_labels"])
    keep = []
    for cls, n in enumerate(cifar_lt_counts(imbalance, len(names))):
        idx = np.where(targets == cls)[0]
        rng.shuffle(idx)
        keep.extend(idx[:n].tolist())

    def specs(d, indices, split):
        data = np.asarray(d[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = d[b"fine_labels"]
        return [Spec(f"{split}_{i:05d}", int(labels[i]), (lambda a=data[i]: ("png", _png(a)))) for i in indices]

    splits = {"train": _shuffled(specs(train, keep, "train"), seed), "test": specs(test, range(len(test[b"fine_labels"])), "test")}
    fp = _fingerprint("cifar100-lt", imbalance, seed, shard_size, hashlib.sha256(archive.read_bytes()).hexdigest())
    cmd = _command("cifar100-lt", archive=_absolute(archive), imbalance=imbalance, seed=seed, shard_size=shard_size)
    return write_dataset(out, f"cifar100-lt-r{imbalance:g}", names, splits, fp, shard_size=shard_size,
                         overwrite=overwrite, command=cmd)
