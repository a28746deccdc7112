"""`prepare index`: existing webdataset shards, described in place in a dataset.json (nothing is copied)."""
from __future__ import annotations

import collections
import concurrent.futures
import glob
import hashlib
import os
import re
import tarfile
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.errors import UserError
from pipeline.locks import exclusive_lock
from pipeline.options import check_ints, option
from pipeline.runtime import progress
from stages.prepare import common
from stages.prepare.classes import load_classnames
from stages.prepare.registry import Source
from stages.prepare.writer import claim, describe, make_fingerprint
from store.shards import DATASET_FILE, IMAGE_EXTS, RESERVED_SPLITS, SPLIT_NAME, LabelKey, has_scheme, local_path
from store.trust import open_shard


def _recorded_shards(_config, shards) -> list[str]:
    """``--shards`` as recorded: each local pattern made absolute (braces and globs kept), URLs as they are."""
    return [f"{split}={p if has_scheme(p) else Path(p).absolute()}" for split, p in _split_patterns(shards).items()]


@dataclass(kw_only=True)
class IndexConfig:
    """Existing webdataset shards, described in place (nothing is copied)."""

    SOURCE: ClassVar[str] = "index"

    shards: list[str] | str = option(MISSING, "--shards", "A split's shards, once per split: local paths or any URL "
                                                          "webdataset opens (http(s)://, pipe:CMD, …), with braces "
                                                          "({000000..000146}) and, for local paths, globs.",
                                     multiple=True, metavar="SPLIT=PATTERN", record=_recorded_shards)
    classes: str = option(MISSING, "--classes", "Class names file (one per line, index = line; or .json, as for "
                                                "`prepare list`) or `imagenet`.", kind=str, record=common.classes_file)
    label_key: str = option("cls", "--label-key", "Member holding each sample's integer label: EXT (e.g. cls) or "
                                                  "EXT:FIELD for a JSON member's field (e.g. json:label).",
                            record=lambda _config, key: str(LabelKey.parse(key, "--label-key")))
    name: str | None = common.name()
    workers: int = option(4, "--workers", "Shards read at once, 1 to 64.", record=False)
    out: str = common.out()
    overwrite: bool = common.overwrite()

    def check(self) -> None:
        """Every option, before anything is read: a one-line UserError naming the first bad one."""
        LabelKey.parse(self.label_key, "--label-key")
        common.check_common(self)
        check_ints(self, (("workers", 1, 64, None),))
        _split_patterns(self.shards)


def prepare_index(cfg: IndexConfig) -> Path:
    """Describe existing webdataset shards in ``cfg.out``/dataset.json without copying them.

    ``cfg.shards``: ``SPLIT=PATTERN`` strings. A pattern is expanded as webdataset expands it (braces:
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
    cfg.check()
    key, out = LabelKey.parse(cfg.label_key, "--label-key"), Path(cfg.out)
    patterns = _split_patterns(cfg.shards)
    names, taxonomy = load_classnames(cfg.classes)
    urls = {split: _expand(split, pattern) for split, pattern in patterns.items()}
    with exclusive_lock(out):
        splits, hashes = {}, {}
        for split, us in urls.items():
            scans = _scan_split(split, us, key, names, cfg.classes, cfg.workers)
            splits[split] = _split_record(f"--shards {split}={patterns[split]}", us, scans, out)
            hashes[split] = [(e, s.sha256) for e, s in zip(splits[split]["shards"], scans)]
        fp = make_fingerprint("index", str(key), names, hashes)
        claim(out, fp, cfg.overwrite, keep_files=True)
        describe(out, cfg.name or out.absolute().name, names, None, fp, common.rebuild_command(cfg), splits,
                 label_key=str(key), indexed=True, **({"taxonomy": taxonomy} if taxonomy else {}))
    return out


def _split_record(option_value: str, urls: list[str], scans: list[_Scan], out: Path) -> dict:
    """dataset.json's entry of one split from its shards' scans; sizes and sha256 of local shards only."""
    local = [local_path(u) is not None for u in urls]
    counts = [sum(c) for c in zip(*(s.counts for s in scans))]
    if not sum(counts):
        raise UserError(f"{option_value}: its shards hold no samples")
    exts = sum((s.image_exts for s in scans), collections.Counter())
    return {"shards": [_shard_entry(u, out) for u in urls],
            "shard_bytes": [s.size if lo else None for s, lo in zip(scans, local)],
            "shard_sha256": [s.sha256 if lo else None for s, lo in zip(scans, local)],
            "num_samples": sum(counts), "class_counts": counts, "skipped": [], "image_exts": dict(sorted(exts.items()))}


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


SOURCE = Source(IndexConfig, prepare_index, wrote=DATASET_FILE)
