"""Stroke glyphs for the 62 EMNIST classes and an anti-aliased 28x28 renderer.

Glyph skeletons come from the Hershey vector fonts (PyPI `Hershey-Fonts`, MIT): each
character is a few polylines, which lets a writer's style act on the strokes (slant,
aspect, wobble, pen width) before rasterizing, the way handwriting varies.
"""

from __future__ import annotations

import functools
import string

import numpy as np
from HersheyFonts import HersheyFonts

# EMNIST-62 label order: digits 0-9, upper case 10-35, lower case 36-61 (as in TFF's loader).
CLASSES = string.digits + string.ascii_uppercase + string.ascii_lowercase
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 28
# Stroke fonts that look like print or handwriting (the gothic and symbol sets do not).
FONTS = ("futural", "futuram", "rowmans", "rowmand", "timesr", "timesi", "scripts", "scriptc", "cursive")
# EMNIST centres the character's bounding box in the frame with a margin; longest side ~20-24 px.
_BOX_PIXELS = 22.0
_PIXEL_CENTRES = (
    np.stack(np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing="xy"), -1)
    .reshape(-1, 2)
    .astype(np.float32)
    + 0.5
)


@functools.cache
def _font(name: str) -> HersheyFonts:
    fonts = HersheyFonts()
    fonts.load_default_font(name)  # decompresses an archive: about 20 ms, so once per font
    return fonts


@functools.cache
def strokes(font: str, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (points [P,2], segments [S,2] as point indices) of one glyph, y pointing down."""
    fonts = _font(font)
    points: list[tuple[float, float]] = []
    segments: list[tuple[int, int]] = []
    for polyline in fonts.strokes_for_text(CLASSES[label]):
        start = len(points)
        points.extend(polyline)
        segments.extend((start + i, start + i + 1) for i in range(len(polyline) - 1))
    if not segments:
        raise ValueError(f"font {font!r} has no strokes for {CLASSES[label]!r}")
    pts = np.asarray(points, dtype=np.float32)
    return pts - pts.mean(axis=0), np.asarray(segments, dtype=np.int32)


def fit_to_frame(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scales the glyph's bounding box to EMNIST's framing (aspect kept), centred, jittered."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    extent = float(max(hi[0] - lo[0], hi[1] - lo[1], 1e-3))
    scale = _BOX_PIXELS * rng.uniform(0.9, 1.05) / extent
    centre = (lo + hi) / 2
    offset = IMAGE_SIZE / 2 + rng.normal(0.0, 0.6, size=2)
    return (points - centre) * scale + offset


def rasterize(points: np.ndarray, segments: np.ndarray, pen_width: float) -> np.ndarray:
    """Returns ink coverage in [0, 1] of a [28, 28] image: 1 inside the pen, soft edge of 1 px."""
    a = points[segments[:, 0]]
    b = points[segments[:, 1]]
    ab = b - a
    length2 = np.maximum(np.einsum("sd,sd->s", ab, ab), 1e-6)
    ap = _PIXEL_CENTRES[:, None, :] - a[None]  # [784, S, 2]
    t = np.clip(np.einsum("psd,sd->ps", ap, ab) / length2, 0.0, 1.0)
    gap = ap - t[..., None] * ab[None]  # pixel minus its nearest point on each segment
    dist = np.sqrt(np.einsum("psd,psd->ps", gap, gap).min(axis=1))
    return np.clip(pen_width / 2 + 0.5 - dist, 0.0, 1.0).reshape(IMAGE_SIZE, IMAGE_SIZE)
