"""The generated demo dataset: coloured shapes whose class names ("red triangle") are compositional.

Each class is a (colour, shape) pair, so a tail class shares words, and visual traits, with head
classes: the text tower can carry what it learned about "red" and "triangle" to "red triangle" even
when that class has only a handful of images. That is the situation BALLAD's text side exploits.
Images get background noise, colour jitter and random position and size, and every image is a pure
function of (seed, split, index), so any shard can be regenerated on its own.

The same module generates the *pretraining corpus* (``corpus_sample``, used by stages/pretrain/run.py):
captioned images ("a small red triangle on a striped background") over more colours (10) and shapes
(8) than the demo's 6 × 5, with size, position, background pattern and clutter as described
attributes. Its style differs from the demo's the way web images differ from a downstream set
(docs/pretraining.md): patterned, darker, noise-free backgrounds, smaller shapes (radius 15–32 % of the
side against the demo's 26–40 %), milder colour jitter and clutter, so zero-shot transfer to the demo is
partial. Its random streams (``CORPUS_STREAM``) are disjoint from the demo's (``SPLIT_STREAM``) for every
pair of seeds, so pretraining never draws a demo image, test images included.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

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
    elif shape == "star":  # five points, inner radius 0.45 r
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "hexagon":
        pts = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
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


# ---------------------------------------------------------------- the pretraining corpus
CORPUS_COLOURS = {**COLOURS, "pink": (240, 120, 190), "brown": (140, 85, 40), "cyan": (40, 200, 215),
                  "white": (245, 245, 245)}
CORPUS_SHAPES = (*SHAPES, "star", "hexagon", "ring")
SIZES = {"small": (0.15, 0.22), "large": (0.23, 0.32)}  # radius as a fraction of the image side
BACKGROUNDS = ("plain", "striped", "checked", "dotted", "gradient")
PREFIXES = ("a", "a photo of a", "an image of a", "a picture of a")
# Streams of numpy's SeedSequence([seed, stream, index]); the demo's splits use 0, 1, 2 (SPLIT_STREAM).
CORPUS_STREAM = {"pretrain": 10, "heldout": 11}


@dataclass(frozen=True)
class CorpusSample:
    image: np.ndarray  # [size, size, 3] uint8
    caption: str
    label: int  # index into corpus_classnames(): the (colour, shape) pair


def corpus_classnames() -> list[str]:
    """Every (colour, shape) pair of the corpus, colour-major; the demo's 30 classes are among them."""
    return [f"{c} {s}" for c in CORPUS_COLOURS for s in CORPUS_SHAPES]


def corpus_sample(seed: int, stream: str, index: int, size: int = 32) -> CorpusSample:
    """Captioned image ``index`` of corpus ``stream`` ('pretrain' or 'heldout'): a pure function of its arguments.

    Balanced: the (colour, shape) pair cycles with ``index``, so any K consecutive indices hold every
    pair once; size, position, background, clutter and which of them the caption names are drawn.
    """
    rng = np.random.default_rng([seed, CORPUS_STREAM[stream], index])
    names = corpus_classnames()
    label = index % len(names)
    colour_name, shape = names[label].split(" ")
    size_word = ("small", "large")[rng.integers(2)]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    clutter = bool(rng.integers(2))

    img = _background(rng, background, size)
    scale = 4  # shapes and clutter are drawn at 4× the size and box-filtered down: anti-aliased edges
    if clutter:
        tone = rng.uniform(90, 200)
        img = _blend(img, _clutter_mask(rng, size * scale, size), np.full(3, tone))
    r = rng.uniform(*SIZES[size_word])
    cx, cy = rng.uniform(r, 1 - r, 2)
    colour = np.clip(np.array(CORPUS_COLOURS[colour_name]) + rng.integers(-20, 21, 3), 0, 255)
    img = _blend(img, _shape_mask(shape, cx, cy, r, rng.uniform(-0.3, 0.3), size * scale, size), colour)

    words = [PREFIXES[rng.integers(len(PREFIXES))]]
    if rng.random() < 0.5:
        words.append(size_word)
    words += [colour_name, shape]
    if rng.random() < 0.3:
        words.append(_position(cx, cy))
    if rng.random() < 0.5:
        words.append(f"on a {background} background")
    if clutter and rng.random() < 0.5:
        words.append("with clutter")
    caption = " ".join(words) + ("." if rng.random() < 0.5 else "")
    return CorpusSample(np.clip(np.round(img), 0, 255).astype(np.uint8), caption, label)


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return "in the middle"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _background(rng, kind: str, size: int) -> np.ndarray:
    """[size, size, 3] float: a dark, slightly tinted tone, patterned with a second tone (no pixel noise)."""
    base = rng.uniform(35, 110) + rng.uniform(-15, 15, 3)
    other = base + rng.choice((-1, 1)) * rng.uniform(25, 45)
    yy, xx = np.mgrid[0:size, 0:size] * (32 / size) + 0.5  # patterns measured in pixels of a 32-px image
    angle = rng.choice((0, math.pi / 2, math.pi / 4, -math.pi / 4))
    along = xx * math.cos(angle) + yy * math.sin(angle)
    period = rng.uniform(4, 8)
    if kind == "plain":
        t = np.zeros((size, size))
    elif kind == "striped":
        t = ((along / period + rng.random()) % 1 < 0.5).astype(float)
    elif kind == "checked":
        t = ((xx // (period / 2) + yy // (period / 2)) % 2).astype(float)
    elif kind == "dotted":
        t = (np.hypot((xx % period) - period / 2, (yy % period) - period / 2) < period / 4).astype(float)
    else:  # gradient
        t = (along - along.min()) / (along.max() - along.min())
    return base * (1 - t[..., None]) + other * t[..., None]


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, big: int, size: int) -> np.ndarray:
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = cx * big, cy * big, r * big
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            h = 0.55 * r
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return _downsample(img, size)


def _clutter_mask(rng, big: int, size: int) -> np.ndarray:
    """Three to six thin strokes and specks in one grey tone: clutter the caption may mention, not a shape."""
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 7)):
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        if rng.random() < 0.6:
            draw.line([x0, y0, x1, y1], fill=255, width=max(1, big // 32))
        else:
            d = big / 32
            draw.ellipse([x0 - d, y0 - d, x0 + d, y0 + d], fill=255)
    return _downsample(img, size)


def _downsample(mask: Image.Image, size: int) -> np.ndarray:
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    return img * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
