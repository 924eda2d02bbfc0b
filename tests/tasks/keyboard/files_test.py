import os
import shutil
import sqlite3

import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import configs, validation
from tffpipe.data import example_proto
from tffpipe.tasks.keyboard import files, generator, words

TINY = configs.TextPopulationConfig(num_users=12, median_messages=6, seed=3)
VOCAB = 100


def _data_config(cache_dir: str, data_dir: str | None = None, vocab_size: int = VOCAB) -> configs.DataConfig:
    return configs.DataConfig(
        data_dir=data_dir, cache_dir=cache_dir, text=configs.TextConfig(vocab_size=vocab_size, population=TINY)
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return generator.ensure_generated(str(tmp_path_factory.mktemp("cache")), TINY, workers=1)


@pytest.fixture
def copy_dir(tiny_dir, tmp_path) -> str:
    """A user's data directory: a copy of the tiny files to spoil."""
    for name in (files.FILE_NAME, files.WORD_COUNT_FILE):
        shutil.copy(os.path.join(tiny_dir, name), tmp_path / name)
    return str(tmp_path)


def _one_error(data_dir: str, match: str) -> str:
    """The single-line DataFileError a user's directory gives, checked before TF is involved."""
    with pytest.raises(files.DataFileError, match=match) as e:
        files.KeyboardData(_data_config(data_dir, data_dir)).prepare()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_embedded_data_is_generated_once_and_described(tmp_path):
    data = files.KeyboardData(_data_config(str(tmp_path)))
    assert data.is_embedded and data.needs_generation()
    # TFF's Stack Overflow baseline: pad 0, words 1..V, OOV buckets, then BOS and EOS: 100 + 1 + 3.
    assert data.num_classes == 104
    assert data.population() == generator.train_clients(TINY) == 12
    data_dir = data.prepare()
    assert not data.needs_generation()
    counts = data.example_counts(data_dir)
    assert len(counts) == 12
    assert counts["u00000"] == generator.split_sizes(generator.message_count(TINY, 0))[0]
    card = data.card(data_dir)
    train_messages = sum(counts.values())
    assert f"| train | 12 | {train_messages:,} |" in card and "| heldout |" in card and "| test |" in card
    assert "per client: min" in card and "users" in card and "messages" in card
    assert words.SOURCE in card and "seed 3" in card
    assert "words used by most train users cover" in card


def test_vocabulary_coverage_on_the_card_is_the_share_of_train_tokens(tiny_dir):
    data = files.KeyboardData(_data_config(os.path.dirname(tiny_dir), vocab_size=VOCAB))
    vocabulary = set(files.read_vocabulary(tiny_dir, VOCAB))
    # The tiny file has fewer train messages than the card samples, so the card reads them all.
    tokens = [
        t for _, blob in _rows(tiny_dir, "train") for t in example_proto.decode_example(blob)["tokens"][0].split()
    ]
    share = sum(t.decode() in vocabulary for t in tokens) / len(tokens)
    assert f"cover {share:.1%} of the sampled train tokens" in data.card(tiny_dir)


def _rows(data_dir: str, split: str) -> list[tuple[str, bytes]]:
    con = sqlite3.connect(os.path.join(data_dir, files.FILE_NAME))
    rows = con.execute(
        "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ?", (split,)
    ).fetchall()
    con.close()
    return rows


def test_read_vocabulary_matches_tffs_word_count_reader(tiny_dir, monkeypatch):
    monkeypatch.setattr(
        tf.keras.utils, "get_file", lambda *args, **kwargs: os.path.join(tiny_dir, "stackoverflow.word_count.tar.bz2")
    )
    expected = list(tff.simulation.datasets.stackoverflow.load_word_counts(cache_dir=tiny_dir, vocab_size=50))
    assert files.read_vocabulary(tiny_dir, 50) == expected


def test_load_gives_tffs_sql_client_data_of_train_and_test(tiny_dir):
    data = files.KeyboardData(_data_config(os.path.dirname(tiny_dir)))
    train, test = data.load(tiny_dir)
    assert isinstance(train, tff.simulation.datasets.SqlClientData)
    assert train.client_ids == [generator.user_id(i) for i in range(12)]
    assert train.element_type_structure == tf.TensorSpec([], tf.string)  # serialized rows, parsed by the task
    rows = list(train.create_tf_dataset_for_client("u00000"))
    assert len(rows) == data.example_counts(tiny_dir)["u00000"]
    assert example_proto.decode_example(rows[0].numpy())["tokens"][0].decode("utf-8")
    assert set(test.client_ids) <= set(train.client_ids)


def test_a_users_good_files_pass_and_their_population_is_read_from_the_file(copy_dir):
    data = files.KeyboardData(_data_config(copy_dir, copy_dir))
    assert not data.is_embedded and not data.needs_generation()
    assert data.prepare() == copy_dir
    assert data.population() == 12


def test_missing_word_count_names_the_file_and_how_to_get_it(copy_dir):
    os.remove(files.word_count_path(copy_dir))
    message = _one_error(copy_dir, "word-count file not found")
    assert files.word_count_path(copy_dir) in message and "stackoverflow.word_count.tar.bz2" in message


def test_word_count_shorter_than_the_vocabulary_is_rejected(copy_dir):
    with open(files.word_count_path(copy_dir), "w") as f:
        f.write("the\t9\n.\t8\n")
    _one_error(copy_dir, r"has 2 words, fewer than vocab_size=100")


@pytest.mark.parametrize(
    "content, match",
    [
        ("the\t9\nof\tmany\n", r"line 2 is 'of\\tmany', not 'word count' with an integer count"),
        ("the\t9\nof\t8.5\n", r"line 2 .* integer count"),
        ("the\t9 extra\n", r"line 1 .* integer count"),
        ("the\t3\nof\t8\n", r"line 2: count 8 is larger than the line before \(3\)"),
        # Non-ASCII digits: '²' passed isdigit() and failed in int() naming no file; '١٠' was read as 10.
        ("the\t9\nof\t\u00b2\n", r"word_count line 2 is 'of\\t²', not 'word count' .* digits 0-9"),
        ("the\t\u0661\u0660\n", r"word_count line 1 is 'the\\t١٠', not 'word count' .* digits 0-9"),
        # TF's vocabulary table fails mid-run on a word with two ids.
        ("the\t9\nof\t8\nthe\t7\n", r"word_count line 3: the word 'the' is already on line 1; each word"),
    ],
)
def test_malformed_word_counts_name_the_file_and_line(copy_dir, content, match):
    with open(files.word_count_path(copy_dir), "w", encoding="utf-8") as f:
        f.write(content)
    assert files.word_count_path(copy_dir) in _one_error(copy_dir, match)


def test_a_word_twice_after_the_vocabulary_is_not_read_and_passes(copy_dir):
    path = files.word_count_path(copy_dir)
    first_word = files.read_vocabulary(copy_dir, 1)[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{first_word}\t0\n")  # on a line after the first vocab_size: not in the vocabulary
    assert files.check_word_counts(path, VOCAB) > VOCAB


def test_a_rare_bad_row_the_sample_misses_is_named_before_training_and_a_good_file_is_read_once(tmp_path):
    data_dir = generator.ensure_generated(str(tmp_path / "gen"), configs.TextPopulationConfig(40, 0, 20), workers=1)
    path = files.database_path(data_dir)
    con = sqlite3.connect(path)
    (total,) = con.execute("SELECT MAX(rowid) FROM examples").fetchone()
    step = total // 64  # the sample's stride (`sql_files.sample_rows`): rows at multiples of it
    rowid, client = con.execute(
        "SELECT rowid, client_id FROM examples WHERE split_name = 'train' AND rowid % ? = 2", (step,)
    ).fetchone()
    good = con.execute("SELECT serialized_example_proto FROM examples WHERE rowid = ?", (rowid,)).fetchone()[0]
    con.execute("UPDATE examples SET serialized_example_proto = x'0a05' WHERE rowid = ?", (rowid,))
    con.commit()
    files.check_database(path)  # the sample passes: this is the row that failed mid-round
    data = files.KeyboardData(_data_config(str(tmp_path / "cache"), data_dir))
    with pytest.raises(files.DataFileError, match=rf"row {rowid} \(client '{client}', split 'train'\) is not a tf\."):
        data.prepare()
    assert not os.path.exists(tmp_path / "cache")  # nothing marked
    con.execute("UPDATE examples SET serialized_example_proto = ? WHERE rowid = ?", (good, rowid))
    con.commit()
    con.close()
    assert data.prepare() == data_dir and os.listdir(tmp_path / "cache" / "checked")
    assert not files.check_every_example(data_dir, str(tmp_path / "cache"))  # marked: not read again


def _spoil_client(data_dir: str, client: str, tokens: bytes) -> None:
    """Replaces every message of one client by one with these tokens."""
    blob = example_proto.encode_example({"tokens": [tokens], "score": [0]})
    con = sqlite3.connect(os.path.join(data_dir, files.FILE_NAME))
    con.execute("UPDATE examples SET serialized_example_proto = ? WHERE client_id = ?", (blob, client))
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "tokens, match",
    [(b"   ", "has empty tokens"), (b"caf\xe9 \xff", "has tokens that are not UTF-8")],
)
def test_a_user_with_empty_or_undecodable_text_is_named(copy_dir, tokens, match):
    for cid in (generator.user_id(i) for i in range(12)):  # every user, so the sample surely meets one
        _spoil_client(copy_dir, cid, tokens)
    message = _one_error(copy_dir, match)
    assert "client 'u000" in message and "split 'train'" in message


def test_a_file_that_is_not_sqlite_is_rejected(copy_dir):
    with open(os.path.join(copy_dir, files.FILE_NAME), "wb") as f:
        f.write(b"\xfd7zXZ\x00" + b"\x00" * 100)  # what an unextracted archive starts with
    message = _one_error(copy_dir, "is not an SQLite database")
    assert "stackoverflow.sqlite.lzma" in message


def test_a_file_without_the_heldout_split_is_rejected(copy_dir):
    con = sqlite3.connect(os.path.join(copy_dir, files.FILE_NAME))
    con.execute("DELETE FROM examples WHERE split_name = 'heldout'")
    con.execute("DELETE FROM client_metadata WHERE split_name = 'heldout'")
    con.commit()
    con.close()
    _one_error(copy_dir, "no clients or examples in split 'heldout'")


def test_a_vocabulary_larger_than_the_embedded_words_names_the_setting(tmp_path, tiny_dir):
    with open(os.path.join(tiny_dir, files.WORD_COUNT_FILE)) as f:
        used = sum(1 for _ in f)
    data = files.KeyboardData(_data_config(str(tmp_path), vocab_size=used + 1))
    with pytest.raises(validation.ConfigError, match=f"vocab_size={used + 1} exceeds the {used} words") as e:
        data.prepare()
    assert e.value.field == "data.text.vocab_size"


def test_samples_are_one_text_line_per_message_under_each_user(tiny_dir, tmp_path):
    import matplotlib.image

    data = files.KeyboardData(_data_config(os.path.dirname(tiny_dir)))
    png = str(tmp_path / "samples.png")
    data.write_samples(tiny_dir, png, clients=2, per_client=3)
    image = matplotlib.image.imread(png)
    # 2 users x (a name line + 3 messages) = 8 lines of 0.2 inch, plus 0.3 inch, at 80 dpi: 152 x 760 pixels.
    assert image.shape[:2] == (152, 760)
    assert image[..., :3].min() < 0.5  # some ink
