"""What `prepare list` and `prepare folder` share: image files under a root, per split as
(relative path, label), → shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.images import open_image, read_file
from stages.prepare.writer import Shrink, Spec, png, shuffled, write_dataset
from store.shards import Taxonomy

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; any other format as PNG


def image_root(root, what: str) -> Path:
    """``--root``, which must be a directory (``what`` it should hold)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: {what} not found")
    return root


def write_files(cfg, root: Path, entries: dict[str, list[tuple[str, int]]], names: list[str], name: str,
                fingerprint: str, command: str, taxonomy: Taxonomy | None) -> Path:
    """Image files under ``root``, per split as (relative path, label), → shards, with ``cfg``'s
    settings. Files are copied byte for byte when JPEG/PNG/WebP (and not shrunk by --max-side); the
    train split is written in a seeded random order, the others in the order given."""
    splits = {split: [Spec(_key(rel), lab, _file_loader(root / rel, cfg.max_pixels)) for rel, lab in es]
              for split, es in entries.items()}
    splits["train"] = shuffled(splits["train"], cfg.seed)
    return write_dataset(cfg.out, name, names, splits, fingerprint, shard_size=cfg.shard_size, skip_bad=cfg.skip_bad,
                         overwrite=cfg.overwrite, command=command, shrink=Shrink.from_options(cfg.max_side,
                                                                                             cfg.jpeg_quality),
                         max_pixels=cfg.max_pixels, taxonomy=taxonomy)


def _file_loader(path: Path, max_pixels: int):
    """A Spec's ``load`` for an image file: the file is decoded whole first (a ``BadImage`` otherwise), so a
    shard never holds an image the stages cannot read; then its bytes, or a PNG of it (KEPT_FORMATS)."""
    def load():
        data = read_file(path)
        image = open_image(data, str(path), max_pixels, mode=None)  # decoded once, in the mode it is stored
        ext = KEPT_FORMATS.get(image.format)
        return (ext, data) if ext else ("png", png(np.asarray(image.convert("RGB"))))

    return load


def _key(rel: str) -> str:
    """A webdataset key: the path without extension, with no dots (webdataset splits at the first dot)."""
    stem = str(Path(rel).with_suffix(""))
    return stem.replace(".", "_")
