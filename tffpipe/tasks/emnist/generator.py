"""Deterministic generator of an EMNIST-62-style federated dataset (the embedded default).

Each client is one writer with a handwriting style of their own: a font family, slant,
aspect, pen width, stroke wobble and size; each example varies again by a small affine
map, smooth elastic jitter of the stroke points and pixel noise. Writers are non-IID
the way real devices are: per-writer label skew (Dirichlet around an EMNIST-like class
frequency) and heavy-tailed quantity skew (log-normal examples per writer).

The output is written in exactly the SQLite layout of TFF's `emnist_all.sqlite`, so
the one loader in `files` reads both. Writing is atomic (temporary file, then rename)
and the file records the generator version and configuration, so an interrupted or
differently configured generation is never reused. Worker processes die with the
process that started them, and a crashed run's temporary file is removed on the next.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from tffpipe import configs, processes
from tffpipe.data import example_proto, sql_files
from tffpipe.tasks.emnist import glyphs

GENERATOR_VERSION = 2
FILE_NAME = "emnist_all.sqlite"
_DIGITS = 10
_CHUNK = 50  # writers per task handed to a worker process

PopulationConfig = configs.PopulationConfig


def base_class_frequency() -> np.ndarray:
    """EMNIST-like class prior: digits about twice as common as each letter."""
    weights = np.concatenate([np.full(_DIGITS, 2.0), np.full(26, 0.7), np.full(26, 0.9)])
    return weights / weights.sum()


@dataclasses.dataclass(frozen=True)
class WriterStyle:
    """How one writer writes: the same for all their examples."""

    fonts: tuple[str, ...]
    font_weights: tuple[float, ...]
    slant: float
    aspect: float
    pen_width: float
    wobble: float
    rotation_deg: float
    spread: float  # the population's style_spread, for per-example variation


def sample_style(rng: np.random.Generator, spread: float = 1.0) -> WriterStyle:
    """Draws a writer's style: mostly one font family, a personal slant, width and pen."""
    fonts = rng.choice(len(glyphs.FONTS), size=3)
    return WriterStyle(
        fonts=tuple(glyphs.FONTS[f] for f in fonts),
        font_weights=(0.7, 0.2, 0.1),
        slant=float(rng.normal(0.0, 0.33 * spread)),
        aspect=float(np.exp(rng.normal(0.0, 0.225 * spread))),
        pen_width=float(rng.uniform(1.3, 3.2)),
        wobble=float(rng.uniform(0.0, 0.075 * spread)),
        rotation_deg=float(rng.normal(0.0, 6.0 * spread)),
        spread=spread,
    )


def render_example(label: int, style: WriterStyle, rng: np.random.Generator) -> np.ndarray:
    """Returns float32 pixels [28, 28] in TFF-EMNIST convention: 1.0 background, 0.0 ink."""
    d = style.spread
    font = style.fonts[rng.choice(len(style.fonts), p=style.font_weights)]
    points, segments = glyphs.strokes(font, label)
    if len(segments) > 4 and rng.random() < 0.225 * d:
        # A pen skip: a contiguous run of about a fifth of the strokes is missing.
        gap = max(1, len(segments) // 5)
        start = rng.integers(0, len(segments) - gap)
        segments = np.concatenate([segments[:start], segments[start + gap :]])
    size = float(np.ptp(points, axis=0).max()) or 1.0
    angle = np.deg2rad(style.rotation_deg + rng.normal(0.0, 4.5 * d))
    shear = style.slant + rng.normal(0.0, 0.075 * d)
    sx = style.aspect * np.exp(rng.normal(0.0, 0.075 * d))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # y points down, so a positive shear leans the top of the glyph to the right.
    affine = rot @ np.array([[sx, -shear], [0.0, 1.0]])
    pts = points @ affine.T
    # Elastic jitter: one smooth random displacement field plus per-point wobble.
    k = rng.normal(0.0, 2.5 / size, size=(2, 2))
    phase = rng.uniform(0, 2 * np.pi, size=2)
    pts = pts + 0.045 * d * size * np.sin(pts @ k + phase)
    pts = pts + rng.normal(0.0, style.wobble * size, size=pts.shape)
    pts = glyphs.fit_to_frame(pts, rng)
    ink = glyphs.rasterize(pts.astype(np.float32), segments, style.pen_width * np.exp(rng.normal(0.0, 0.1)))
    pixels = 1.0 - ink + rng.normal(0.0, 0.02, size=ink.shape)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32)


def writer_id(index: int) -> str:
    return f"w{index:05d}"


class WriterPlan(NamedTuple):
    """One writer's draws, all made before any rendering; `rng` then renders their examples."""

    rng: np.random.Generator
    style: WriterStyle
    class_probs: np.ndarray  # the writer's label distribution (Dirichlet around the class prior)
    labels: np.ndarray  # one per example, train examples first
    n_test: int


def writer_plan(config: PopulationConfig, index: int) -> WriterPlan:
    """The draws that decide writer `index`'s style, label skew and example count."""
    rng = np.random.default_rng([config.seed, index])
    style = sample_style(rng, config.style_spread)
    n = int(np.exp(rng.normal(np.log(config.median_examples), config.quantity_sigma)))
    n = max(config.min_examples, min(n, 10 * config.median_examples))
    class_probs = rng.dirichlet(config.label_concentration * glyphs.NUM_CLASSES * base_class_frequency())
    labels = rng.choice(glyphs.NUM_CLASSES, size=n, p=class_probs)
    n_test = min(n - 1, max(1, int(round(n * config.test_fraction))))
    return WriterPlan(rng, style, class_probs, labels, n_test)


def _writer_examples(config: PopulationConfig, index: int) -> list[tuple[str, int, bytes]]:
    """All rows of one writer as (split, label, serialized example); train rows first."""
    rng, style, _, labels, n_test = writer_plan(config, index)
    n = len(labels)
    rows = []
    for i, label in enumerate(labels):
        split = "test" if i >= n - n_test else "train"
        pixels = render_example(int(label), style, rng)
        stored = int(rng.integers(glyphs.NUM_CLASSES)) if rng.random() < config.label_noise else int(label)
        rows.append((split, stored, serialize_example(pixels, stored)))
    return rows


def train_clients(config: PopulationConfig, only_digits: bool) -> int:
    """Writers with training examples (in the digit splits: with a digit), without rendering any.

    Exact for label_noise = 0 (the default); with label noise an upper bound for the digit splits.
    """
    if not only_digits:
        return config.num_writers  # every writer keeps at least one training example
    count = 0
    for index in range(config.num_writers):
        plan = writer_plan(config, index)
        train_labels = plan.labels[: len(plan.labels) - plan.n_test]
        count += bool(config.label_noise > 0 or (train_labels < _DIGITS).any())
    return count


def serialize_example(pixels: np.ndarray, label: int) -> bytes:
    """Encodes `tf.train.Example{label: int64_list[1], pixels: float_list[784]}`, without TF.

    The generator's worker processes never load TensorFlow; the test suite checks the
    bytes against TF's parser.
    """
    return example_proto.encode_example({"label": [label], "pixels": pixels})


def _writer_chunk(config: PopulationConfig, indices: Sequence[int]) -> list[tuple[int, list]]:
    return [(i, _writer_examples(config, i)) for i in indices]


def generate(
    config: PopulationConfig,
    path: str,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> None:
    """Writes the population to `path` atomically, in the layout of TFF's emnist_all.sqlite.

    Args:
      config: the population.
      path: the file to write; a temporary file beside it is renamed over it at the end.
      workers: processes rendering writers (None: one per core).
      progress: called with (writers done, writers) as chunks complete.
      stop_requested: polled between chunks; True abandons the file (`processes.Interrupted`).
    """
    with sql_files.replaced_atomically(path) as (tmp,), sql_files.new_database(tmp, GENERATOR_VERSION, config) as con:
        for result in processes.map_over_ranges(
            _writer_chunk,
            config,
            config.num_writers,
            chunk=_CHUNK,
            processes=workers,
            progress=progress,
            stop_requested=stop_requested,
        ):
            for index, rows in result:
                _insert_writer(con, writer_id(index), rows)


def _insert_writer(con: sqlite3.Connection, cid: str, rows: Sequence[tuple[str, int, bytes]]) -> None:
    for part in ("train", "test"):
        all_rows = [(f"all_{part}", cid, blob) for split, _, blob in rows if split == part]
        digit_rows = [(f"digits_only_{part}", cid, blob) for split, y, blob in rows if split == part and y < _DIGITS]
        for batch in (all_rows, digit_rows):
            if batch:
                con.executemany("INSERT INTO examples VALUES (?, ?, ?)", batch)
                con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, batch[0][0], len(batch)))


def read_config(path: str) -> PopulationConfig | None:
    """The configuration recorded in a generated file, or None if absent or from another version."""
    return sql_files.recorded_config(path, GENERATOR_VERSION, PopulationConfig)


def cached_data_dir(cache_dir: str, config: PopulationConfig) -> str:
    """Where this population is (or will be) generated: named after its fingerprint."""
    return os.path.join(cache_dir, f"embedded-{config.fingerprint(GENERATOR_VERSION)}")


def is_generated(cache_dir: str, config: PopulationConfig) -> bool:
    path = os.path.join(cached_data_dir(cache_dir, config), FILE_NAME)
    return os.path.exists(path) and read_config(path) == config


def ensure_generated(
    cache_dir: str,
    config: PopulationConfig,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> str:
    """Returns a data directory holding this population's emnist_all.sqlite, generating it once.

    The directory is named after the configuration's fingerprint, so another
    configuration gets its own file; a file whose recorded configuration does not
    match (tampered, or an older generator) is regenerated, never reused.
    """
    data_dir = cached_data_dir(cache_dir, config)
    path = os.path.join(data_dir, FILE_NAME)
    if is_generated(cache_dir, config):
        return data_dir
    sql_files.writable_directory(data_dir)
    sql_files.remove_stale_temporaries(path)
    generate(config, path, workers=workers, progress=progress, stop_requested=stop_requested)
    return data_dir
