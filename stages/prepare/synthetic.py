"""`prepare synthetic`: the generated long-tailed shapes demo (stages/shapes.py draws the images)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.options import INT_MAX, check_ints, option
from pipeline.shared_options import seed
from stages.prepare import common
from stages.prepare.registry import Source
from stages.prepare.writer import Shrink, Spec, make_fingerprint, write_dataset


@dataclass(kw_only=True)
class SyntheticConfig:
    """The generated long-tailed shapes demo ("red triangle", …)."""

    SOURCE: ClassVar[str] = "synthetic"

    out: str = common.out()
    imbalance: float = common.imbalance()
    seed: int = seed("Seed of the head classes, the images and the splits' order.")
    max_count: int = option(300, "--max-count", "Train images of the largest class.")
    test_per_class: int = option(20, "--test-per-class", "Test images per class.")
    val_per_class: int = option(10, "--val-per-class", "Val images per class.")
    image_size: int = option(32, "--image-size", "Side of the square images, 8 to 1024 pixels.")
    shard_size: int = common.shard_size()
    max_side: int | None = common.max_side()
    jpeg_quality: int | None = common.jpeg_quality()
    overwrite: bool = common.overwrite()

    def check(self) -> None:
        """Every option, before anything is written: a one-line UserError naming the first bad one."""
        common.check_imbalance(self.imbalance)  # at most --max-count in effect: long_tailed_counts keeps one image
        # Below 8 px a triangle, a diamond and a circle are a few alike pixels; the shapes are drawn at 4× the size.
        check_ints(self, (("max_count", 1, INT_MAX, None), ("test_per_class", 1, INT_MAX, None),
                          ("val_per_class", 1, INT_MAX, None), ("image_size", 8, 1024, None)))
        common.check_common(self)


def prepare_synthetic(cfg: SyntheticConfig) -> Path:
    """The long-tailed shapes demo: 30 (colour, shape) classes, exponential train counts, balanced val/test."""
    from stages import shapes

    cfg.check()
    names = shapes.classnames()
    rng = np.random.default_rng(cfg.seed)
    # Which class is the head is drawn per seed, so "red" is not always frequent.
    order = rng.permutation(len(names))
    counts = np.zeros(len(names), dtype=int)
    counts[order] = shapes.long_tailed_counts(len(names), cfg.max_count, cfg.imbalance)

    def specs(split: str, per_class) -> list[Spec]:
        labels = np.repeat(np.arange(len(names)), per_class)
        labels = labels[np.random.default_rng([cfg.seed, shapes.SPLIT_STREAM[split]]).permutation(len(labels))]
        return [Spec(f"{split}_{i:06d}", int(lab), _render_fn(int(lab), cfg.seed, split, i, cfg.image_size))
                for i, lab in enumerate(labels)]

    splits = {"train": specs("train", counts), "val": specs("val", cfg.val_per_class),
              "test": specs("test", cfg.test_per_class)}
    fp = make_fingerprint("shapes", cfg.imbalance, cfg.seed, cfg.max_count, cfg.test_per_class, cfg.val_per_class,
                          cfg.image_size, cfg.shard_size)
    return write_dataset(cfg.out, "shapes-lt", names, splits, fp, shard_size=cfg.shard_size, overwrite=cfg.overwrite,
                         command=common.rebuild_command(cfg), shrink=Shrink.from_options(cfg.max_side, cfg.jpeg_quality))


def _render_fn(label, seed, split, index, size):
    from stages.shapes import render

    return lambda: ("png", render(label, seed, split, index, size))


SOURCE = Source(SyntheticConfig, prepare_synthetic)
