"""The generated demo dataset: coloured shapes whose class names ("red triangle") are compositional.

Each class is a (colour, shape) pair, so a tail class shares words, and visual traits, with head
classes: the text tower can carry what it learned about "red" and "triangle" to "red triangle" even
when that class has only a handful of images. That is the situation BALLAD's text side exploits.
Images get background noise, colour jitter and random position and size, and every image is a pure
function of (seed, split, index), so any shard can be regenerated on its own.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


def classnames() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def long_tailed_counts(num_classes: int, max_count: int, imbalance: float) -> list[int]:
    """Exponential profile n_i = ⌊n_max · ρ^(−i/(K−1))⌋ (the CIFAR-LT profile), at least 1 per class."""
    return [max(1, int(max_count * imbalance ** (-i / max(num_classes - 1, 1)))) for i in range(num_classes)]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float):
    if shape == "square":
        pts = [(r, r), (-r, r), (-r, -r), (r, -r)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "diamond":
        pts = [(0, -r), (0.65 * r, 0), (0, r), (-0.65 * r, 0)]
    elif shape == "cross":
        w = r / 3
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def render(label: int, seed: int, split: str, index: int, size: int = 32) -> bytes:
    """PNG bytes of image ``index`` of ``split`` for class ``label``; deterministic in all arguments."""
    rng = np.random.default_rng([seed, SPLIT_STREAM[split], index])
    colour_name, shape = classnames()[label].split(" ")
    scale = 4  # draw large and downsample for anti-aliased edges
    S = size * scale
    bg = rng.integers(60, 200)
    noise = rng.normal(0, 12, (S // scale, S // scale, 3))
    base = np.clip(bg + rng.integers(-30, 30, 3) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base).resize((S, S), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    r = S * rng.uniform(0.26, 0.40)
    cx, cy = rng.uniform(r, S - r, 2)
    colour = tuple(int(np.clip(v + rng.integers(-35, 36), 0, 255)) for v in COLOURS[colour_name])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        angle = rng.uniform(-0.3, 0.3)
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=colour)
    img = img.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
