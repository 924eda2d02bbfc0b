"""Keyboard data in TFF's Stack Overflow layout: the user's files or the embedded ones, checked, loaded, described.

TFF's `tff.simulation.datasets.stackoverflow.load_data` and `load_word_counts` download
their files when missing; tffpipe never does. `KeyboardData` is the task's data source:
it reads files the user already has (or generates the embedded population once), checks
the SQLite file (header, tables, the train/heldout/test splits and a sample of examples
whose `tokens` must be UTF-8 text) and the word counts before TensorFlow is involved,
and loads the splits with TFF's own `SqlClientData`.

Files (TFF's names): `stackoverflow.sqlite`, examples with the bytes features tokens
(lowercase, space-joined, punctuation separate), title, tags, creation_date and type
and an int64 score; `stackoverflow.word_count`, one "word count" line per word, most
train users first, whose first `vocab_size` words are the vocabulary.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable

from tffpipe import configs, validation
from tffpipe.data import example_proto, sql_files
from tffpipe.tasks.keyboard import generator, words

FILE_NAME = generator.FILE_NAME
WORD_COUNT_FILE = generator.WORD_COUNT_FILE
SPLITS = ("train", "heldout", "test")
SPECIAL_TOKENS = 3  # pad, beginning and end of sentence, as TFF's Stack Overflow baseline counts them
_CHECKED_EXAMPLES = 64  # per split, spread over the file
_CARD_EXAMPLES = 4000  # train examples the card's token statistics are computed on
HOW_TO_GET = (
    "Download https://storage.googleapis.com/tff-datasets-public/stackoverflow.sqlite.lzma and "
    "https://storage.googleapis.com/tff-datasets-public/stackoverflow.word_count.tar.bz2 on a machine with internet "
    "access and decompress them into the data directory (`unxz --format=lzma stackoverflow.sqlite.lzma`, "
    "`tar xjf stackoverflow.word_count.tar.bz2`); or use the embedded generated data (no data directory)."
)
STACK_OVERFLOW_SOURCE = "TFF's Stack Overflow data is derived from the Stack Exchange data dump (CC BY-SA 3.0)"

DataFileError = sql_files.DataFileError


def database_path(data_dir: str) -> str:
    """Absolute: the path is written into the dataset graphs a worker runs, maybe in another directory."""
    return os.path.abspath(os.path.join(data_dir, FILE_NAME))


def word_count_path(data_dir: str) -> str:
    return os.path.join(data_dir, WORD_COUNT_FILE)


def check_database(path: str) -> dict[str, int]:
    """Checks header, tables, the three splits and a sample of examples; returns clients per split.

    Raises:
      DataFileError: naming the file, the client and what is wrong, and how to get a good one.
    """
    counts = sql_files.check_database(path, SPLITS, HOW_TO_GET)
    for split in SPLITS:
        for client_id, blob in sql_files.sample_rows(path, split, _CHECKED_EXAMPLES):
            problem = example_problem(blob)
            if problem:
                raise DataFileError(
                    f"{path}: an example of client {client_id!r} in split {split!r} {problem}; TFF's Stack Overflow "
                    f"examples hold their text as one UTF-8 `tokens` bytes value. {HOW_TO_GET}"
                )
    return counts


def check_every_example(
    data_dir: str,
    cache_dir: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Checks every example of a user's file once (`sql_files.check_every_row`); marks it in `cache_dir`.

    The embedded files need no such check: the generator wrote them.

    Raises:
      DataFileError: naming the file, the row and its client.
    """
    return sql_files.check_every_row(
        database_path(data_dir),
        example_problem,
        check_name="keyboard-examples-v1",
        marks_dir=os.path.join(cache_dir, sql_files.CHECKED_DIR),
        what_is_expected="TFF's Stack Overflow examples hold their text as one UTF-8 `tokens` bytes value.",
        how_to_get=HOW_TO_GET,
        progress=progress,
        stop_requested=stop_requested,
    )


def example_problem(blob: bytes) -> str | None:
    """What is wrong with one serialized example, or None."""
    tokens = example_proto.single_bytes_value(blob, "tokens")  # the fast path, for a good example
    if tokens is not None:
        with contextlib.suppress(UnicodeDecodeError):
            if tokens.decode("utf-8").strip():
                return None
    try:
        features = example_proto.decode_example(blob)
    except example_proto.ProtoError as e:
        return f"is not a tf.train.Example ({e})"
    tokens = features.get("tokens")
    if tokens is None:
        return f"lacks tokens (has {sorted(features)})"
    if len(tokens) != 1 or not isinstance(tokens[0], bytes):
        return f"has {len(tokens)} tokens values instead of one bytes value"
    try:
        text = tokens[0].decode("utf-8")
    except UnicodeDecodeError as e:
        return f"has tokens that are not UTF-8 ({e.reason} at byte {e.start})"
    if not text.strip():
        return "has empty tokens"
    return None


def check_word_counts(path: str, vocab_size: int, how_to_get: str = HOW_TO_GET) -> int:
    """Checks a word-count file as TFF's `load_word_counts` reads it; returns its lines.

    Each line is "word<whitespace>count" with a count in ASCII digits, counts never
    rising, at least `vocab_size` lines (the vocabulary is the first `vocab_size`
    words) and no word twice among them: TF's vocabulary table refuses a key given two
    ids, mid-run (FailedPreconditionError).

    Raises:
      DataFileError: naming the file, the line and how to get a good one.
    """
    if not os.path.isfile(path):
        raise DataFileError(f"word-count file not found: {path}. {how_to_get}")
    previous, lines = None, 0
    first_line: dict[str, int] = {}  # vocabulary word -> its line; bounded by vocab_size
    try:
        with open(path, encoding="utf-8") as f:
            for lines, line in enumerate(f, start=1):
                parts = line.split()
                # isdigit() alone admits '²' (int() then fails) and '١' (read as 1): ASCII digits only.
                if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
                    raise DataFileError(
                        f"{path} line {lines} is {line.rstrip()!r}, not 'word count' with an integer count in the "
                        f"digits 0-9. {how_to_get}"
                    )
                if lines <= vocab_size:
                    seen = first_line.setdefault(parts[0], lines)
                    if seen != lines:
                        raise DataFileError(
                            f"{path} line {lines}: the word {parts[0]!r} is already on line {seen}; each word must "
                            f"appear once. {how_to_get}"
                        )
                count = int(parts[1])
                if previous is not None and count > previous:
                    raise DataFileError(
                        f"{path} line {lines}: count {count} is larger than the line before ({previous}); the words "
                        f"must be sorted by count, most frequent first. {how_to_get}"
                    )
                previous = count
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path} is not UTF-8 text ({e.reason}). {how_to_get}") from e
    if lines < vocab_size:
        raise DataFileError(
            f"{path} has {lines} words, fewer than vocab_size={vocab_size}; lower vocab_size or use a complete "
            f"word-count file. {how_to_get}"
        )
    return lines


def read_vocabulary(data_dir: str, vocab_size: int) -> list[str]:
    """The first `vocab_size` words of the word-count file (TFF's `load_word_counts` order), without TF."""
    vocabulary = []
    with open(word_count_path(data_dir), encoding="utf-8") as f:
        for line in f:
            if len(vocabulary) == vocab_size:
                break
            vocabulary.append(line.split()[0])
    return vocabulary


def client_example_counts(data_dir: str) -> dict[str, int]:
    """Train messages per client, from `client_metadata` (no example is read)."""
    return sql_files.client_counts(database_path(data_dir), "train")


def load_client_rows(data_dir: str):
    """Returns (train, test) `tff.simulation.datasets.SqlClientData` of serialized tf.train.Example rows.

    The heldout split is checked but not loaded (TFF's baseline validates on it). Never downloads.
    """
    import tensorflow_federated as tff

    path = os.path.abspath(database_path(data_dir))  # SqlDataset bakes the path into its graph
    check_database(path)
    return tuple(tff.simulation.datasets.SqlClientData(path, split) for split in ("train", "test"))


def _token_sample(path: str) -> list[list[str]]:
    rows = sql_files.sample_rows(path, "train", _CARD_EXAMPLES)
    return [example_proto.decode_example(blob)["tokens"][0].decode("utf-8").split() for _, blob in rows]


class KeyboardData:
    """The keyboard data of a run: the user's files (`data_dir`) or the embedded population.

    Standard library only until `load` is called, so the privacy plan and every check
    can run before TensorFlow is imported or any data is generated.
    """

    def __init__(self, config: configs.DataConfig):
        self._config = config
        self._text = config.text

    @property
    def num_classes(self) -> int:
        """Output ids: pad, the vocabulary, the out-of-vocabulary buckets, beginning and end of sentence."""
        return self._text.vocab_size + self._text.num_oov_buckets + SPECIAL_TOKENS

    @property
    def is_embedded(self) -> bool:
        return self._config.data_dir is None

    def needs_generation(self) -> bool:
        return self.is_embedded and not generator.is_generated(self._config.cache_dir, self._text.population)

    def population(self) -> int:
        """Training clients that can be sampled; cheap (no example is read or generated)."""
        if self.is_embedded:
            return generator.train_clients(self._text.population)
        return check_database(database_path(self._config.data_dir))["train"]

    def prepare(
        self,
        *,
        progress: Callable[[int, int], None] | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> str:
        """The checked data directory, generating the embedded data once if needed.

        Raises:
          DataFileError: a user's file that is missing or malformed.
          validation.ConfigError: the embedded population uses fewer words than vocab_size.
        """
        if not self.is_embedded:
            data_dir = self._config.data_dir
            check_database(database_path(data_dir))
            check_word_counts(word_count_path(data_dir), self._text.vocab_size)
            check_every_example(data_dir, self._config.cache_dir, progress=progress, stop_requested=stop_requested)
            return data_dir
        data_dir = generator.ensure_generated(
            self._config.cache_dir, self._text.population, progress=progress, stop_requested=stop_requested
        )
        try:
            check_word_counts(word_count_path(data_dir), self._text.vocab_size)
        except DataFileError:
            with open(word_count_path(data_dir), encoding="utf-8") as f:
                used = sum(1 for _ in f)
            raise validation.ConfigError(
                "data.text.vocab_size",
                f"vocab_size={self._text.vocab_size} exceeds the {used} words the embedded population's train "
                "messages use; lower data.text.vocab_size or raise data.text.population.num_users",
            ) from None
        return data_dir

    def load(self, data_dir: str):
        """(train, test) SqlClientData of serialized rows (TF)."""
        return load_client_rows(data_dir)

    def example_counts(self, data_dir: str) -> dict[str, int]:
        return client_example_counts(data_dir)

    def worker_files(self, data_dir: str) -> list[str]:
        """The files a worker reads while it builds client datasets (at these absolute paths)."""
        return [database_path(data_dir)]

    def card(self, data_dir: str) -> str:
        """The data card: users and messages per split, message length, vocabulary coverage, source."""
        path = database_path(data_dir)
        stats = sql_files.split_statistics(path, SPLITS)
        messages = _token_sample(path)
        lengths = sorted(len(m) for m in messages)
        vocabulary = set(read_vocabulary(data_dir, self._text.vocab_size))
        tokens = sum(lengths)
        covered = sum(t in vocabulary for m in messages for t in m)
        recorded = generator.read_config(path)
        if recorded is not None:
            source = (
                f"Generated by tffpipe's keyboard generator (version {generator.GENERATOR_VERSION}, "
                f"{recorded.num_users} users, seed {recorded.seed}) from {words.SOURCE}."
            )
        else:
            source = f"Files from {data_dir} in TFF's Stack Overflow layout; {STACK_OVERFLOW_SOURCE}."
        return (
            sql_files.statistics_markdown(stats, "users").replace("examples", "messages")
            + f"\n\nTokens per message (words and punctuation; {len(messages):,} train messages sampled): "
            f"median {statistics.median(lengths):g}, mean {tokens / len(lengths):.1f}, "
            f"p90 {lengths[int(0.9 * (len(lengths) - 1))]}, max {lengths[-1]}."
            f"\n\nVocabulary: the {self._text.vocab_size:,} words used by most train users cover "
            f"{covered / tokens:.1%} of the sampled train tokens; the rest map to "
            f"{self._text.num_oov_buckets} out-of-vocabulary bucket(s).\n\n{source}"
        )

    def write_samples(self, data_dir: str, png_path: str, clients: int = 8, per_client: int = 12) -> None:
        write_sample_text(data_dir, png_path, clients, per_client)


def write_sample_text(data_dir: str, png_path: str, users: int = 8, per_user: int = 12) -> None:
    """A PNG listing, per user, their first train messages as text lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with sql_files.connect(database_path(data_dir)) as con:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT client_id FROM client_metadata WHERE split_name='train' ORDER BY client_id LIMIT ?", (users,)
            )
        ]
        lines: list[tuple[str, str]] = []
        for cid in ids:
            lines.append((cid, "bold"))
            for (blob,) in con.execute(
                "SELECT serialized_example_proto FROM examples WHERE client_id=? AND split_name='train' "
                "ORDER BY rowid LIMIT ?",
                (cid, per_user),
            ):
                text = example_proto.decode_example(blob)["tokens"][0].decode("utf-8", errors="replace")
                lines.append(("  " + (text if len(text) <= 110 else text[:107] + "..."), "normal"))
    height = 0.2 * len(lines) + 0.3
    fig = plt.figure(figsize=(9.5, height), dpi=80)
    for row, (text, weight) in enumerate(lines):
        fig.text(0.01, 1 - (row + 1) * 0.2 / height, text, fontsize=8, family="monospace", weight=weight)
    fig.savefig(png_path)
    plt.close(fig)
