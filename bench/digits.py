"""python -m bench.digits OUT: a long-tailed real-image set from scikit-learn's handwritten digits.

scikit-learn ships 1,797 scanned 8 × 8 digits (UCI optdigits) inside its package, so this needs no
download: ``pip install scikit-learn`` (the ``bench`` extra). Per class a seeded shuffle, then a
balanced test (30) and val (10) split and a long-tailed train split n_i = ⌊140 · ρ^(−i/9)⌋ (ρ = 28:
140 → 5 images). Images are upscaled ×4 (nearest) to 32 px greyscale PNGs; `prepare list` then makes
the shards like any ImageNet-LT-style list:

    python -m bench.digits /tmp/digits-lt
    ballad-pipe prepare list --root /tmp/digits-lt --train-list /tmp/digits-lt/train.txt \\
        --val-list /tmp/digits-lt/val.txt --test-list /tmp/digits-lt/test.txt \\
        --classes /tmp/digits-lt/classes.txt --name digits-lt --out data/digits-lt

Class names are the digit words ("zero" … "nine"); the prompt is the dataset's default template.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEST, VAL, MAX_TRAIN, IMBALANCE = 30, 10, 140, 28.0


def make(out: Path, seed: int = 0) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_train = int(MAX_TRAIN * IMBALANCE ** (-c / 9))
        parts = {"test": idx[:TEST], "val": idx[TEST:TEST + VAL], "train": idx[TEST + VAL:TEST + VAL + n_train]}
        for split, members in parts.items():
            for i in members:
                rel = f"{split}/{WORDS[c]}/{i:04d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # values 0–16
                Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(out / rel)
                rows[split].append(f"{rel} {c}")
    for split, lines in rows.items():
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (out / "classes.txt").write_text("\n".join(WORDS) + "\n")
    return {split: len(lines) for split, lines in rows.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make(args.out, args.seed)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
