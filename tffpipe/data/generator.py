"""Deterministic generator of an EMNIST-62-style federated dataset (the embedded default).

Each client is one writer with a handwriting style of their own: a font family, slant,
aspect, pen width, stroke wobble and size; each example varies again by a small affine
map, smooth elastic jitter of the stroke points and pixel noise. Writers are non-IID
the way real devices are: per-writer label skew (Dirichlet around an EMNIST-like class
frequency) and heavy-tailed quantity skew (log-normal examples per writer).

The output is written in exactly the SQLite layout of TFF's `emnist_all.sqlite`, so
the one loader in `emnist_files` reads both. Writing is atomic (temporary file, then
rename) and the file records the generator version and configuration, so an
interrupted or differently configured generation is never reused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sqlite3
from collections.abc import Iterator, Sequence

import numpy as np

from tffpipe.data import emnist_files, glyphs

GENERATOR_VERSION = 2
METADATA_TABLE = "tffpipe_generator"
_DIGITS = 10


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """Size and skew of a generated population.

    Attributes:
      num_writers: clients (writers) in the population.
      seed: the only source of randomness; the same config gives identical bytes.
      median_examples: median examples per writer (log-normal quantity skew).
      quantity_sigma: log-normal sigma of examples per writer; 0 gives equal sizes.
      label_concentration: Dirichlet concentration per class around the base class
        frequency; small values give writers few classes, large values near-IID.
      test_fraction: share of each writer's examples held out into the test split.
      min_examples: floor of examples per writer (at least one train, one test).
      style_spread: scales every style and per-example variation (slant, rotation,
        wobble, elastic jitter, stroke gaps); 1.0 is tuned so a CNN lands near real
        EMNIST-62's accuracy, larger is harder.
      label_noise: fraction of examples whose stored label is a random class, as
        transcription errors in the NIST forms behind EMNIST.
    """

    num_writers: int = 3400
    seed: int = 0
    median_examples: int = 60
    quantity_sigma: float = 0.8
    label_concentration: float = 2.0
    test_fraction: float = 0.1
    min_examples: int = 4
    style_spread: float = 1.0
    label_noise: float = 0.0

    def __post_init__(self):
        for name in ("num_writers", "median_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_examples < 2:
            raise ValueError(f"min_examples must be at least 2 (one train, one test), got {self.min_examples}")
        if self.quantity_sigma < 0:
            raise ValueError(f"quantity_sigma must be >= 0, got {self.quantity_sigma}")
        if self.label_concentration <= 0:
            raise ValueError(f"label_concentration must be positive, got {self.label_concentration}")
        if self.style_spread < 0:
            raise ValueError(f"style_spread must be >= 0, got {self.style_spread}")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    def fingerprint(self) -> str:
        """Short stable hash of version and configuration; names the cache directory."""
        blob = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


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


def _writer_examples(config: PopulationConfig, index: int) -> list[tuple[str, int, bytes]]:
    """All rows of one writer as (split, label, serialized example); train rows first."""
    rng = np.random.default_rng([config.seed, index])
    style = sample_style(rng, config.style_spread)
    n = int(np.exp(rng.normal(np.log(config.median_examples), config.quantity_sigma)))
    n = max(config.min_examples, min(n, 10 * config.median_examples))
    class_probs = rng.dirichlet(config.label_concentration * glyphs.NUM_CLASSES * base_class_frequency())
    labels = rng.choice(glyphs.NUM_CLASSES, size=n, p=class_probs)
    n_test = min(n - 1, max(1, int(round(n * config.test_fraction))))
    rows = []
    for i, label in enumerate(labels):
        split = "test" if i >= n - n_test else "train"
        pixels = render_example(int(label), style, rng)
        stored = int(rng.integers(glyphs.NUM_CLASSES)) if rng.random() < config.label_noise else int(label)
        rows.append((split, stored, serialize_example(pixels, stored)))
    return rows


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def serialize_example(pixels: np.ndarray, label: int) -> bytes:
    """Encodes `tf.train.Example{pixels: float_list[784], label: int64_list[1]}`.

    Hand-encoded (the wire format is four nested messages) so generation needs no
    TensorFlow in the worker processes; the test suite checks it against TF's parser.
    """
    float_list = _field(1, pixels.astype("<f4").tobytes())
    int64_list = _field(1, _varint(label))
    entries = _field(1, _field(1, b"label") + _field(2, _field(3, int64_list)))
    entries += _field(1, _field(1, b"pixels") + _field(2, _field(2, float_list)))
    return _field(1, entries)


def _writer_chunk(config: PopulationConfig, indices: Sequence[int]) -> list[tuple[int, list]]:
    return [(i, _writer_examples(config, i)) for i in indices]


def _iter_writers(config: PopulationConfig, workers: int) -> Iterator[tuple[int, list]]:
    """Yields (writer index, rows) in writer order, rendered on `workers` processes."""
    chunks = [range(s, min(s + 50, config.num_writers)) for s in range(0, config.num_writers, 50)]
    if workers <= 1:
        for chunk in chunks:
            yield from _writer_chunk(config, chunk)
        return
    # forkserver: the parent may hold TF threads, which fork would copy mid-lock.
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for result in pool.map(_writer_chunk, [config] * len(chunks), chunks):
            yield from result


def generate(config: PopulationConfig, path: str, *, workers: int | None = None) -> None:
    """Writes the population to `path` atomically, in the layout of TFF's emnist_all.sqlite."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute(
            "CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL,"
            " serialized_example_proto BLOB NOT NULL)"
        )
        con.execute(
            "CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL,"
            " num_examples INTEGER NOT NULL)"
        )
        con.execute(f"CREATE TABLE {METADATA_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for index, rows in _iter_writers(config, workers):
            cid = writer_id(index)
            for part in ("train", "test"):
                all_rows = [(f"all_{part}", cid, blob) for split, _, blob in rows if split == part]
                digit_rows = [
                    (f"digits_only_{part}", cid, blob) for split, y, blob in rows if split == part and y < _DIGITS
                ]
                for batch in (all_rows, digit_rows):
                    if batch:
                        con.executemany("INSERT INTO examples VALUES (?, ?, ?)", batch)
                        con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, batch[0][0], len(batch)))
        # TFF queries one client at a time; without this index each query scans the table.
        con.execute("CREATE INDEX examples_by_client ON examples (client_id, split_name)")
        con.executemany(
            f"INSERT INTO {METADATA_TABLE} VALUES (?, ?)",
            [("version", str(GENERATOR_VERSION)), ("config", json.dumps(dataclasses.asdict(config), sort_keys=True))],
        )
        con.commit()
    finally:
        con.close()
    os.replace(tmp, path)


def read_config(path: str) -> PopulationConfig | None:
    """The configuration recorded in a generated file, or None if absent or from another version."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(con.execute(f"SELECT key, value FROM {METADATA_TABLE}"))
        finally:
            con.close()
    except sqlite3.Error:
        return None
    if meta.get("version") != str(GENERATOR_VERSION) or "config" not in meta:
        return None
    return PopulationConfig(**json.loads(meta["config"]))


def ensure_generated(cache_dir: str, config: PopulationConfig, *, workers: int | None = None) -> str:
    """Returns a data directory holding this population's emnist_all.sqlite, generating it once.

    The directory is named after the configuration's fingerprint, so another
    configuration gets its own file; a file whose recorded configuration does not
    match (tampered, or an older generator) is regenerated, never reused.
    """
    data_dir = os.path.join(cache_dir, f"embedded-{config.fingerprint()}")
    path = os.path.join(data_dir, emnist_files.FILE_NAME)
    if os.path.exists(path) and read_config(path) == config:
        return data_dir
    os.makedirs(data_dir, exist_ok=True)
    generate(config, path, workers=workers)
    return data_dir
