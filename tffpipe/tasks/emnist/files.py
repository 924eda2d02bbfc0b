"""Federated EMNIST in TFF's SQLite layout: the user's file or the embedded one, checked, loaded, described.

TFF's `tff.simulation.datasets.emnist.load_data` downloads `emnist_all.sqlite` when it
is missing; tffpipe never does. `EmnistData` is the task's data source: it reads a
file the user already has (or generates the embedded population once), checks its
header, tables, splits and a sample of its examples (shape, values, label range)
before TensorFlow is involved, and loads it with TFF's own `SqlClientData`.

Pixel convention (TFF's docstring, kept as is): float32 [28, 28] in [0, 1] with 1.0
the background and 0.0 the ink, upright; labels 0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z'.
"""

from __future__ import annotations

import collections
import math
import os
import string
from collections.abc import Callable

from tffpipe import configs
from tffpipe.data import example_proto, sql_files
from tffpipe.tasks.emnist import generator

FILE_NAME = generator.FILE_NAME
SPLITS = {True: ("digits_only_train", "digits_only_test"), False: ("all_train", "all_test")}
ALL_SPLITS = (*SPLITS[False], *SPLITS[True])
NUM_CLASSES = {True: 10, False: 62}
CLASSES = string.digits + string.ascii_uppercase + string.ascii_lowercase
PIXELS = 28 * 28
_CHECKED_EXAMPLES = 64  # per split, spread over the file
HOW_TO_GET = (
    "Download https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma on a machine "
    "with internet access and decompress it (`unxz --format=lzma emnist_all.sqlite.lzma`) into the "
    "data directory; or use the embedded generated data (no data directory)."
)

DataFileError = sql_files.DataFileError


def database_path(data_dir: str) -> str:
    """Absolute: the path is written into the dataset graphs a worker runs, maybe in another directory."""
    return os.path.abspath(os.path.join(data_dir, FILE_NAME))


def check_database(path: str, only_digits: bool) -> dict[str, int]:
    """Checks header, tables, splits and a sample of examples; returns clients per split.

    Raises:
      DataFileError: naming the file, what is wrong, and how to get a good one.
    """
    counts = sql_files.check_database(path, SPLITS[only_digits], HOW_TO_GET)
    for split in SPLITS[only_digits]:
        for client_id, blob in sql_files.sample_rows(path, split, _CHECKED_EXAMPLES):
            problem = example_problem(blob, NUM_CLASSES[only_digits])
            if problem:
                raise DataFileError(
                    f"{path}: an example of client {client_id!r} in split {split!r} {problem}; TFF's EMNIST examples "
                    f"hold 784 pixels in [0, 1] and a label in [0, {NUM_CLASSES[only_digits]}). {HOW_TO_GET}"
                )
    return counts


def example_problem(blob: bytes, num_classes: int) -> str | None:
    """What is wrong with one serialized example, or None."""
    try:
        features = example_proto.decode_example(blob)
    except example_proto.ProtoError as e:
        return f"is not a tf.train.Example ({e})"
    pixels, label = features.get("pixels"), features.get("label")
    if pixels is None or label is None:
        return f"lacks {'pixels' if pixels is None else 'label'} (has {sorted(features)})"
    if len(pixels) != PIXELS or not all(isinstance(p, float) for p in pixels):
        return f"has {len(pixels)} pixel values instead of 784 floats"
    if not all(math.isfinite(p) and -1e-6 <= p <= 1 + 1e-6 for p in pixels):
        return "has pixel values outside [0, 1]"
    if len(label) != 1 or not isinstance(label[0], int) or not 0 <= label[0] < num_classes:
        return f"has label {label} outside [0, {num_classes})"
    return None


def client_example_counts(data_dir: str, only_digits: bool = False) -> dict[str, int]:
    """Training examples per client, from `client_metadata` (no example is read)."""
    return sql_files.client_counts(database_path(data_dir), SPLITS[only_digits][0])


def parse(serialized):
    """Serialized tf.train.Example rows (one or a batch) -> OrderedDict(label=int32, pixels=float32 [..., 28, 28]).

    The same elements TFF's loader produces. Parsing a batch at once is one op per
    batch instead of one per example, which is what makes batching before parsing pay.
    """
    import tensorflow as tf

    features = tf.io.parse_example(
        serialized,
        {
            "pixels": tf.io.FixedLenFeature(shape=(28, 28), dtype=tf.float32),
            "label": tf.io.FixedLenFeature(shape=(), dtype=tf.int64),
        },
    )
    return collections.OrderedDict(label=tf.cast(features["label"], tf.int32), pixels=features["pixels"])


def load_pooled_rows(data_dir: str, only_digits: bool = False, train: bool = True):
    """All clients' serialized examples of one split as one tf.data.Dataset (centralized baselines)."""
    import tensorflow as tf

    path = database_path(data_dir)
    check_database(path, only_digits)
    split = SPLITS[only_digits][0 if train else 1]
    return tf.data.experimental.SqlDataset(
        "sqlite", path, f"SELECT serialized_example_proto FROM examples WHERE split_name = '{split}'", tf.string
    )


def load_client_rows(data_dir: str, only_digits: bool = False):
    """Returns (train, test) `ClientData` of serialized tf.train.Example rows, unparsed.

    What the training pipeline reads: the task batches a client's rows and parses each
    batch with one op (`parse`), instead of one parse per example.
    """
    import tensorflow_federated as tff

    path = database_path(data_dir)
    check_database(path, only_digits)
    return tuple(tff.simulation.datasets.SqlClientData(path, split) for split in SPLITS[only_digits])


def load_client_data(data_dir: str, only_digits: bool = False):
    """Returns (train, test) `tff.simulation.datasets.ClientData` of parsed examples.

    Elements are `OrderedDict(label=int32[], pixels=float32[28, 28])`, the same as TFF's
    loader produces. Never downloads.
    """
    train, test = load_client_rows(data_dir, only_digits)
    return train.preprocess(lambda ds: ds.map(parse)), test.preprocess(lambda ds: ds.map(parse))


class EmnistData:
    """The EMNIST data of a run: the user's file (`data_dir`) or the embedded population.

    Standard library only until `load` is called, so the privacy plan and every check
    can run before TensorFlow is imported or any data is generated.
    """

    def __init__(self, config: configs.DataConfig):
        self._config = config

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self._config.only_digits]

    @property
    def is_embedded(self) -> bool:
        return self._config.data_dir is None

    def needs_generation(self) -> bool:
        return self.is_embedded and not generator.is_generated(self._config.cache_dir, self._config.population)

    def population(self) -> int:
        """Training clients that can be sampled; cheap (no example is read or generated)."""
        if self.is_embedded:
            return generator.train_clients(self._config.population, self._config.only_digits)
        counts = check_database(database_path(self._config.data_dir), self._config.only_digits)
        return counts[SPLITS[self._config.only_digits][0]]

    def prepare(
        self,
        *,
        progress: Callable[[int, int], None] | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> str:
        """The checked data directory, generating the embedded data once if needed."""
        if self.is_embedded:
            return generator.ensure_generated(
                self._config.cache_dir, self._config.population, progress=progress, stop_requested=stop_requested
            )
        check_database(database_path(self._config.data_dir), self._config.only_digits)
        return self._config.data_dir

    def load(self, data_dir: str):
        """(train, test) ClientData of serialized rows (TF)."""
        return load_client_rows(data_dir, self._config.only_digits)

    def example_counts(self, data_dir: str) -> dict[str, int]:
        return client_example_counts(data_dir, self._config.only_digits)

    def worker_files(self, data_dir: str) -> list[str]:
        """The files a worker reads while it builds client datasets (at these absolute paths)."""
        return [database_path(data_dir)]

    def card(self, data_dir: str) -> str:
        """The data card: clients and examples per split, and the classes."""
        stats = sql_files.split_statistics(database_path(data_dir), ALL_SPLITS)
        return (
            sql_files.statistics_markdown(stats, "writers")
            + f"\n\n{NUM_CLASSES[False]} classes (0-9, A-Z, a-z); the digits_only splits hold the digit examples."
        )

    def write_samples(self, data_dir: str, png_path: str, clients: int = 8, per_client: int = 12) -> None:
        write_sample_grid(data_dir, png_path, clients, per_client)


def write_sample_grid(data_dir: str, png_path: str, writers: int = 8, per_writer: int = 12) -> None:
    """A PNG with one row per writer: their first training examples, labels underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with sql_files.connect(database_path(data_dir)) as con:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT client_id FROM client_metadata WHERE split_name='all_train' ORDER BY client_id LIMIT ?",
                (writers,),
            )
        ]
        blobs = {
            cid: con.execute(
                "SELECT serialized_example_proto FROM examples WHERE client_id=? AND split_name='all_train' LIMIT ?",
                (cid, per_writer),
            ).fetchall()
            for cid in ids
        }
    fig, axes = plt.subplots(len(ids), per_writer, figsize=(per_writer * 0.7, len(ids) * 0.85), dpi=60, squeeze=False)
    for row, cid in enumerate(ids):
        for col in range(per_writer):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(blobs[cid]):
                features = example_proto.decode_example(blobs[cid][col][0])
                ax.imshow(np.array(features["pixels"]).reshape(28, 28), cmap="gray", vmin=0, vmax=1)
                ax.set_title(CLASSES[features["label"][0]], fontsize=7, pad=1)
        axes[row, 0].text(-4, 14, cid, fontsize=6, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    fig.savefig(png_path)
    plt.close(fig)
