"""Federated EMNIST in TFF's SQLite layout: integrity checks and the one loader.

TFF's `tff.simulation.datasets.emnist.load_data` downloads `emnist_all.sqlite` when
it is missing; this module never does. It reads a file the user already has (or the
embedded generator wrote) with TFF's own `SqlClientData`, after checking that it is
what it claims to be, so a wrong or truncated file fails here with a message that
says how to get a good one, not inside a TF dataset op mid-round.

Pixel convention (TFF's docstring, kept as is): float32 [28, 28] in [0, 1] with 1.0
the background and 0.0 the ink, upright; labels 0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z'.
"""

from __future__ import annotations

import collections
import os
import sqlite3

FILE_NAME = "emnist_all.sqlite"
SPLITS = {True: ("digits_only_train", "digits_only_test"), False: ("all_train", "all_test")}
NUM_CLASSES = {True: 10, False: 62}
_SQLITE_MAGIC = b"SQLite format 3\x00"
HOW_TO_GET = (
    "Download https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma on a machine "
    "with internet access, decompress it (`unxz --format=lzma emnist_all.sqlite.lzma`) into the "
    "directory given by --data_dir; or omit --data_dir to use the embedded generated data."
)


class DataFileError(ValueError):
    """The EMNIST file is missing, not SQLite, or lacks the expected tables or splits."""


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, FILE_NAME)


def check_database(path: str, only_digits: bool) -> dict[str, int]:
    """Checks header, tables and splits; returns clients per split. Raises DataFileError."""
    if not os.path.isfile(path):
        raise DataFileError(f"EMNIST file not found: {path}. {HOW_TO_GET}")
    with open(path, "rb") as f:
        if f.read(16) != _SQLITE_MAGIC:
            raise DataFileError(
                f"{path} is not an SQLite database (bad header): is it still LZMA-compressed? {HOW_TO_GET}"
            )
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = {"examples", "client_metadata"} - tables
            if missing:
                raise DataFileError(f"{path} lacks the tables {sorted(missing)} of TFF's EMNIST layout. {HOW_TO_GET}")
            counts = {}
            for split in SPLITS[only_digits]:
                clients = con.execute(
                    "SELECT COUNT(*) FROM client_metadata WHERE split_name = ? AND num_examples > 0", (split,)
                ).fetchone()[0]
                has_rows = con.execute("SELECT 1 FROM examples WHERE split_name = ? LIMIT 1", (split,)).fetchone()
                if not clients or not has_rows:
                    raise DataFileError(f"{path} has no clients or examples in split {split!r}. {HOW_TO_GET}")
                counts[split] = clients
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise DataFileError(f"{path} is a damaged SQLite database ({e}). {HOW_TO_GET}") from e
    return counts


def client_example_counts(data_dir: str, only_digits: bool = False) -> dict[str, int]:
    """Training examples per client, from `client_metadata` (no example is read)."""
    con = sqlite3.connect(f"file:{database_path(data_dir)}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?", (SPLITS[only_digits][0],)
        )
        return {cid: int(n) for cid, n in rows}
    finally:
        con.close()


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

    What the training pipeline reads: `preprocessing` batches the rows and parses each
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
