"""TFF's SQLite client-data layout, shared by every task: checks, statistics, writing.

TFF ships its federated datasets (EMNIST, Stack Overflow, ...) as one SQLite file with
`examples(split_name, client_id, serialized_example_proto)` and
`client_metadata(client_id, split_name, num_examples)`, read by
`tff.simulation.datasets.SqlClientData`. tffpipe reads real files of that layout and
writes its embedded data in it, so one loader serves both. Everything here is the
standard library: the checks run before TensorFlow is imported, and a bad file fails
with a message that says how to get a good one, not inside a dataset op mid-round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence

from tffpipe import errors, processes

_SQLITE_MAGIC = b"SQLite format 3\x00"
TEMP_INFIX = ".tmp-"  # `<file>.tmp-<pid>`: a file being written by process <pid>


class DataFileError(errors.InputError):
    """A data file that is missing, not SQLite, or lacks the expected tables, splits or content."""

    field = "data.data_dir"


class CacheDirError(errors.InputError):
    """A cache directory the embedded data cannot be generated in."""

    field = "data.cache_dir"


def writable_directory(path: str) -> str:
    """Creates `path`, a directory of the cache to generate files in, refusing one that cannot be written.

    A read-only cache directory would otherwise fail inside the generator (an OSError
    traceback); a cache whose data is already generated is only read and needs no write.

    Raises:
      CacheDirError: naming the directory and why.
    """
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CacheDirError(
            f"cannot create {path} to generate the embedded data in ({e.strerror}); give a writable cache_dir"
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheDirError(f"cannot write the embedded data into {path} (not writable); give a writable cache_dir")
    return path


def read_only_uri(path: str) -> str:
    """The SQLite URI that opens `path` read-only: the one place such a URI is built.

    The path is percent-escaped (`pathlib`'s `as_uri`): SQLite reads `?` as the start
    of the parameters, `#` as a fragment and `%XX` as an escape, so an unescaped
    `/data#1/x.sqlite` opened (and created) `/data`, dropping `?mode=ro`. TF's
    `SqlDataset` takes a plain path, not a URI, and needs no escaping.
    """
    return f"{pathlib.Path(os.path.abspath(path)).as_uri()}?mode=ro"


@contextlib.contextmanager
def connect(path: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection that is always closed."""
    con = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        yield con
    finally:
        con.close()


def check_database(path: str, splits: Sequence[str], how_to_get: str) -> dict[str, int]:
    """Checks header, tables and splits; returns the clients with examples per split.

    Raises:
      DataFileError: naming the file and `how_to_get` a good one.
    """
    if not os.path.isfile(path):
        raise DataFileError(f"data file not found: {path}. {how_to_get}")
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise DataFileError(f"cannot read {path}: {e}. {how_to_get}") from e
    if header != _SQLITE_MAGIC:
        raise DataFileError(f"{path} is not an SQLite database (bad header): is it still LZMA-compressed? {how_to_get}")
    try:
        with connect(path) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = {"examples", "client_metadata"} - tables
            if missing:
                raise DataFileError(f"{path} lacks the tables {sorted(missing)} of TFF's layout. {how_to_get}")
            counts = {}
            for split in splits:
                clients = con.execute(
                    "SELECT COUNT(*) FROM client_metadata WHERE split_name = ? AND num_examples > 0", (split,)
                ).fetchone()[0]
                has_rows = con.execute("SELECT 1 FROM examples WHERE split_name = ? LIMIT 1", (split,)).fetchone()
                if not clients or not has_rows:
                    raise DataFileError(f"{path} has no clients or examples in split {split!r}. {how_to_get}")
                counts[split] = clients
    except sqlite3.DatabaseError as e:
        raise DataFileError(f"{path} is a damaged SQLite database ({e}). {how_to_get}") from e
    return counts


def client_counts(path: str, split: str) -> dict[str, int]:
    """Examples per client of one split, from `client_metadata` (no example is read)."""
    with connect(path) as con:
        rows = con.execute("SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?", (split,))
        return {cid: int(n) for cid, n in rows}


def sample_rows(path: str, split: str, count: int) -> list[tuple[str, bytes]]:
    """(client id, serialized example) of up to `count` rows spread over the split, deterministically."""
    query = "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ?"
    with connect(path) as con:
        total = con.execute("SELECT MAX(rowid) FROM examples").fetchone()[0] or 0
        step = max(1, total // max(count, 1))
        rows = con.execute(f"{query} AND rowid % ? = 0 LIMIT ?", (split, step, count)).fetchall()
        return rows or con.execute(f"{query} LIMIT ?", (split, count)).fetchall()


CHECKED_DIR = "checked"  # in the cache directory: one mark per data file whose every row passed a check
_STOP_POLL_ROWS = 10_000


def file_identity(path: str) -> str:
    """A key that changes when the file at `path` is replaced or written: path, inode, size, mtime."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def check_every_row(
    path: str,
    problem: Callable[[bytes], str | None],
    *,
    check_name: str,
    marks_dir: str,
    what_is_expected: str,
    how_to_get: str,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Checks every example of `path` with `problem`, once per file: a later call on the same file is free.

    A sample misses a file's rare bad rows (1% of them, say), which then fail inside a
    dataset op on a worker, mid-round, after the experiment directory was made. So the
    first run reads every row; when all pass it leaves a mark (the path) named after
    `check_name` and the file's identity (`file_identity`) in `marks_dir`, and the next
    run with the same, unchanged file skips the check. A `marks_dir` that cannot be
    written only costs the next run the check again.

    Args:
      problem: what is wrong with one serialized example, or None.
      check_name: names the check and its version; change it when `problem` changes.
      what_is_expected: a sentence on what a good example holds, for the error.
      progress: on a file of more than 10,000 rows, called with (clients done, clients)
        now and then: clients as `client_metadata` counts them (client and split), done
        as the row order brings them (TFF's files and tffpipe's hold each client's rows
        together).

    Returns:
      Whether the rows were read (False: the mark says they passed before).

    Raises:
      DataFileError: naming the file, the row, its client and split, what is wrong and `how_to_get` a good one.
      processes.Interrupted: when `stop_requested` turns True.
    """
    mark = os.path.join(marks_dir, f"{check_name}-{file_identity(path)}")
    if os.path.exists(mark):
        return False
    query = "SELECT rowid, client_id, split_name, serialized_example_proto FROM examples"
    try:
        with connect(path) as con:
            clients = con.execute("SELECT COUNT(*) FROM client_metadata").fetchone()[0] if progress else 0
            group, groups, done = None, 0, 0
            for done, (rowid, client_id, split, blob) in enumerate(con.execute(query), start=1):
                if (client_id, split) != group:
                    group, groups = (client_id, split), groups + 1
                if isinstance(blob, bytes):
                    found = problem(blob)
                else:
                    found = f"holds {type(blob).__name__} where a serialized example belongs"
                if found:
                    raise DataFileError(
                        f"{path}: row {rowid} (client {client_id!r}, split {split!r}) {found}; {what_is_expected} "
                        f"{how_to_get}"
                    )
                if done % _STOP_POLL_ROWS == 0:
                    if stop_requested():
                        raise processes.Interrupted()
                    if progress and clients:
                        progress(min(groups, clients - 1), clients)
    except sqlite3.DatabaseError as e:
        raise DataFileError(f"{path} is a damaged SQLite database ({e}). {how_to_get}") from e
    if progress and clients and done >= _STOP_POLL_ROWS:
        progress(clients, clients)
    with contextlib.suppress(OSError):
        os.makedirs(marks_dir, exist_ok=True)
        with replaced_atomically(mark) as (tmp,), open(tmp, "w") as f:
            f.write(f"{os.path.abspath(path)}\n")
    return True


def split_statistics(path: str, splits: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per split: clients, examples, and per-client example counts (min, median, mean, p90, max)."""
    stats = {}
    for split in splits:
        n = sorted(client_counts(path, split).values())
        if not n:
            continue
        total = sum(n)
        stats[split] = {
            "clients": len(n),
            "examples": total,
            "min": n[0],
            "median": _percentile(n, 50),
            "mean": total / len(n),
            "p90": _percentile(n, 90),
            "max": n[-1],
        }
    return stats


def _percentile(ordered: Sequence[int], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy.percentile's default."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def statistics_markdown(stats: dict[str, dict[str, float]], client_noun: str = "clients") -> str:
    lines = [
        f"| split | {client_noun} | examples | per client: min | median | mean | p90 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, s in stats.items():
        lines.append(
            f"| {split} | {s['clients']:,} | {s['examples']:,} | {s['min']} | {s['median']:g} | {s['mean']:.1f} | "
            f"{s['p90']:g} | {s['max']} |"
        )
    return "\n".join(lines)


def create_layout(con: sqlite3.Connection) -> None:
    """TFF's tables in a new database being written."""
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


GENERATOR_TABLE = "tffpipe_generator"  # what wrote an embedded file: generator version and configuration


def record_generator(con: sqlite3.Connection, version: int, config) -> None:
    """Records the generator version and its (dataclass) configuration in a file being written."""
    con.execute(f"CREATE TABLE IF NOT EXISTS {GENERATOR_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.executemany(
        f"INSERT INTO {GENERATOR_TABLE} VALUES (?, ?)",
        [("version", str(version)), ("config", json.dumps(dataclasses.asdict(config), sort_keys=True))],
    )


def recorded_config(path: str, version: int, config_class: type):
    """The configuration a generator recorded in `path`, or None if absent or from another version."""
    try:
        with connect(path) as con:
            meta = dict(con.execute(f"SELECT key, value FROM {GENERATOR_TABLE}"))
    except sqlite3.Error:
        return None
    if meta.get("version") != str(version) or "config" not in meta:
        return None
    return config_class(**json.loads(meta["config"]))


def index_layout(con: sqlite3.Connection) -> None:
    """TFF queries one client at a time; without this index each query scans the table."""
    con.execute("CREATE INDEX examples_by_client ON examples (client_id, split_name)")


def temporary_path(path: str) -> str:
    return f"{path}{TEMP_INFIX}{os.getpid()}"


@contextlib.contextmanager
def replaced_atomically(*paths: str) -> Iterator[list[str]]:
    """Yields temporary paths beside `paths` to write; renames them over `paths`, in order, if the block succeeds.

    If the block raises (or is interrupted), the temporaries are removed and `paths`
    are untouched. Put the file that marks the set as complete last.
    """
    temporaries = [temporary_path(p) for p in paths]
    for tmp in temporaries:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    try:
        yield temporaries
    except BaseException:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    for tmp, path in zip(temporaries, paths, strict=True):
        os.replace(tmp, path)


@contextlib.contextmanager
def new_database(path: str, version: int, config) -> Iterator[sqlite3.Connection]:
    """A connection to a new file in TFF's layout; the block inserts the clients' rows.

    When the block succeeds the file is indexed, records the generator `version` and
    its `config`, and is committed; it is closed either way.
    """
    con = sqlite3.connect(path)
    try:
        create_layout(con)
        yield con
        index_layout(con)
        record_generator(con, version, config)
        con.commit()
    finally:
        con.close()


def remove_stale_temporaries(path: str) -> list[str]:
    """Deletes `<path>.tmp-<pid>` files of processes that no longer run (a crashed writer's)."""
    removed = []
    for candidate in glob.glob(f"{glob.escape(path)}{TEMP_INFIX}*"):
        pid = candidate.rsplit(TEMP_INFIX, 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(candidate)
                removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
