import collections
import hashlib
import importlib.util
import json
import os
import re
import sqlite3
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import configs, processes
from tffpipe.data import example_proto
from tffpipe.tasks.keyboard import generator, words

TINY = configs.TextPopulationConfig(num_users=12, median_messages=6, seed=3)
# Enough text per user for per-user statistics, still well under a second.
SMALL = configs.TextPopulationConfig(num_users=30, median_messages=30, seed=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return generator.ensure_generated(str(tmp_path_factory.mktemp("cache")), TINY, workers=1)


def _db(data_dir: str) -> str:
    return os.path.join(data_dir, generator.FILE_NAME)


def _digest(data_dir: str) -> str:
    """Every example, in order, and both count files."""
    h = hashlib.sha256()
    con = sqlite3.connect(_db(data_dir))
    for row in con.execute("SELECT split_name, client_id, serialized_example_proto FROM examples ORDER BY rowid"):
        h.update(repr(row).encode())
    con.close()
    for name in (generator.WORD_COUNT_FILE, generator.TAG_COUNT_FILE):
        with open(os.path.join(data_dir, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _messages(data_dir: str, split: str | None = None) -> dict[str, list[dict]]:
    """{client: [decoded features]} in file order, read without TF."""
    con = sqlite3.connect(_db(data_dir))
    query = "SELECT client_id, serialized_example_proto FROM examples"
    rows = con.execute(query + " WHERE split_name = ? ORDER BY rowid", (split,)) if split else con.execute(query)
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for cid, blob in rows.fetchall():
        out[cid].append(example_proto.decode_example(blob))
    con.close()
    return out


def _tff_word_counts(data_dir: str, monkeypatch, **kwargs):
    """TFF's own readers of the count files, pointed at `data_dir` instead of downloading."""
    archive = os.path.join(data_dir, "stackoverflow.word_count.tar.bz2")
    monkeypatch.setattr(tf.keras.utils, "get_file", lambda *args, **kw: archive)
    return tff.simulation.datasets.stackoverflow.load_word_counts(cache_dir=data_dir, **kwargs)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    config = configs.TextPopulationConfig(num_users=60, median_messages=3, seed=1)  # two chunks of users
    for name, workers in (("a", 1), ("b", 2)):  # worker processes write the same bytes
        os.makedirs(tmp_path / name)
        generator.generate(config, str(tmp_path / name), workers=workers)
    os.makedirs(tmp_path / "c")
    generator.generate(configs.TextPopulationConfig(num_users=60, median_messages=3, seed=2), str(tmp_path / "c"))
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))
    assert _digest(str(tmp_path / "a")) != _digest(str(tmp_path / "c"))


def test_file_round_trips_through_tffs_own_stackoverflow_loader(tiny_dir):
    train, heldout, test = tff.simulation.datasets.stackoverflow.load_data(cache_dir=tiny_dir)  # no download
    assert train.client_ids == [generator.user_id(i) for i in range(TINY.num_users)]
    assert train.element_type_structure == collections.OrderedDict(
        creation_date=tf.TensorSpec([], tf.string),
        score=tf.TensorSpec([], tf.int64),
        tags=tf.TensorSpec([], tf.string),
        title=tf.TensorSpec([], tf.string),
        tokens=tf.TensorSpec([], tf.string),
        type=tf.TensorSpec([], tf.string),
    )
    elements = list(train.create_tf_dataset_for_client("u00000"))
    assert len(elements) == generator.split_sizes(generator.message_count(TINY, 0))[0]
    topics = set(generator.TOPICS)
    for e in elements:
        tokens = e["tokens"].numpy().decode("utf-8")
        assert tokens == tokens.lower() and "  " not in tokens
        assert re.fullmatch(rb"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC", e["creation_date"].numpy())
        assert set(e["tags"].numpy().decode().split("|")) <= topics
        # A message asking something is a question, as on Stack Overflow; its title is the question.
        assert e["type"].numpy() == (b"question" if " ?" in tokens or tokens.startswith("?") else b"answer")
        assert e["title"].numpy().decode() in tokens
    assert heldout.client_ids and test.client_ids


def test_punctuation_is_a_token_of_its_own(tiny_dir):
    tokens = [t for ms in _messages(tiny_dir).values() for m in ms for t in m["tokens"][0].decode().split(" ")]
    assert all(t in generator.PUNCTUATION or re.fullmatch(r"[a-z']+", t) for t in tokens)
    assert {".", ",", "?", "!"} <= set(tokens)


def test_word_count_file_counts_distinct_train_users_and_reads_with_tffs_reader(tiny_dir, monkeypatch):
    users_per_word: collections.Counter = collections.Counter()
    for messages in _messages(tiny_dir, "train").values():
        users_per_word.update({t for m in messages for t in m["tokens"][0].decode().split(" ")})
    with open(os.path.join(tiny_dir, generator.WORD_COUNT_FILE)) as f:
        lines = [line.rstrip("\n").split("\t") for line in f]
    assert {w: int(n) for w, n in lines} == users_per_word
    # Most users first, ties by word; a count is a number of users, 1 to 12.
    assert [(w, int(n)) for w, n in lines] == sorted(users_per_word.items(), key=lambda kv: (-kv[1], kv[0]))
    assert 1 <= int(lines[-1][1]) <= int(lines[0][1]) <= TINY.num_users
    tff_counts = _tff_word_counts(tiny_dir, monkeypatch, vocab_size=20)
    assert list(tff_counts.items()) == [(w, int(n)) for w, n in lines[:20]]


def test_tag_count_holds_the_train_users_of_each_topic(tiny_dir):
    with open(os.path.join(tiny_dir, generator.TAG_COUNT_FILE)) as f:
        tag_counts = json.load(f)
    users_per_tag: collections.Counter = collections.Counter()
    for messages in _messages(tiny_dir, "train").values():
        users_per_tag.update(messages[0]["tags"][0].decode().split("|"))
    assert tag_counts == users_per_tag
    assert sum(tag_counts.values()) >= TINY.num_users  # each user has 1-3 topics


def test_splits_follow_time_per_user(tiny_dir):
    # The last tenth of a user's messages tests, the tenth before it is held out.
    assert generator.split_sizes(10) == (8, 1, 1)
    assert generator.split_sizes(25) == (19, 3, 3)  # int(2.5 + 0.5) = 3 each
    assert generator.split_sizes(5) == (3, 1, 1)
    assert generator.split_sizes(4) == (4, 0, 0)  # int(0.4 + 0.5) = 0
    assert generator.split_sizes(2) == (2, 0, 0)
    by_split = {split: _messages(tiny_dir, split) for split in generator.SPLITS}
    for cid in by_split["train"]:
        dates = [m["creation_date"][0] for split in generator.SPLITS for m in by_split[split].get(cid, [])]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)
        assert len(dates) == generator.message_count(TINY, int(cid[1:]))


def test_message_length_is_that_of_typed_messages():
    lengths = [
        sum(t not in generator.PUNCTUATION for t in m["tokens"].split())
        for i in range(SMALL.num_users)
        for m in generator.user_messages(SMALL, i)[1]
    ]
    # Log-normal with median 8 words, capped at 40: half the messages have at most 8 words.
    assert 7 <= np.median(lengths) <= 9
    assert max(lengths) <= generator.MAX_WORDS and min(lengths) >= 1
    assert 0.02 < np.mean(np.array(lengths) >= 20) < 0.15  # P(8 e^(0.6 Z) >= 19.5) = P(Z >= 1.49) = 7%


def test_users_reuse_their_own_words_more_than_other_users_words():
    common = set(generator.lexicon().words[:100]) | set(generator.PUNCTUATION)
    first, second = {}, {}
    for i in range(SMALL.num_users):
        messages = generator.user_messages(SMALL, i)[1]
        train = [set(m["tokens"].split()) - common for m in messages[: generator.split_sizes(len(messages))[0]]]
        half = len(train) // 2
        first[i], second[i] = set().union(*train[:half]), set().union(*train[half:])
    users = [u for u in first if first[u] and second[u]]
    # Share of the content words (not among the 100 most frequent) of a user's later train
    # messages already used in their earlier ones: own = |B_u & A_u| / |B_u|, against the
    # same with another user's earlier words, |B_u & A_v| / |B_u|, averaged over all v != u.
    # Contacts' names, stock phrases, habits, personal words and topic preferences make own
    # 0.21-0.23 and other 0.06-0.08 (measured over seeds 0-4: ratios 2.7-3.8); a chain shared
    # by all users would give 1.
    own = np.mean([len(second[u] & first[u]) / len(second[u]) for u in users])
    other = np.mean([len(second[u] & first[v]) / len(second[u]) for u in users for v in users if v != u])
    assert own / other > 2.0


def test_quantity_skew_is_log_normal_around_the_median():
    config = configs.TextPopulationConfig(num_users=2000, median_messages=60, quantity_sigma=1.0)
    counts = np.array([generator.message_count(config, i) for i in range(config.num_users)])
    # int(60 e^Z) has median 60 and, for sigma 1, a coefficient of variation near sqrt(e - 1) = 1.31
    # before the cap at 10 * 60 trims the tail.
    assert 55 <= np.median(counts) <= 65
    assert counts.std() / counts.mean() > 0.9 and counts.min() >= generator.MIN_MESSAGES
    assert counts.max() <= 600
    equal = configs.TextPopulationConfig(num_users=20, median_messages=60, quantity_sigma=0.0)
    assert {generator.message_count(equal, i) for i in range(20)} == {60}


def test_train_clients_equals_the_files_count_without_generating(tiny_dir):
    con = sqlite3.connect(_db(tiny_dir))
    in_file = con.execute("SELECT COUNT(DISTINCT client_id) FROM examples WHERE split_name = 'train'").fetchone()[0]
    con.close()
    assert generator.train_clients(TINY) == in_file == TINY.num_users


def test_the_file_records_its_config_and_a_mismatched_file_is_regenerated(tmp_path):
    a = configs.TextPopulationConfig(num_users=2, median_messages=4, seed=1)
    b = configs.TextPopulationConfig(num_users=2, median_messages=4, seed=2)
    dir_a = generator.ensure_generated(str(tmp_path), a, workers=1)
    dir_b = generator.ensure_generated(str(tmp_path), b, workers=1)
    assert dir_a != dir_b and os.path.basename(dir_a) == f"keyboard-{a.fingerprint(generator.GENERATOR_VERSION)}"
    assert generator.read_config(_db(dir_a)) == a and generator.is_generated(str(tmp_path), a)
    os.replace(_db(dir_b), _db(dir_a))
    assert not generator.is_generated(str(tmp_path), a)
    generator.ensure_generated(str(tmp_path), a, workers=1)
    assert generator.read_config(_db(dir_a)) == a


def test_a_crashed_generations_temporary_files_are_removed_on_the_next_start(tmp_path):
    config = configs.TextPopulationConfig(num_users=2, median_messages=4, seed=1)
    data_dir = generator.cached_data_dir(str(tmp_path), config)
    os.makedirs(data_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = (generator.FILE_NAME, generator.WORD_COUNT_FILE, generator.TAG_COUNT_FILE)
    for name in names:
        open(os.path.join(data_dir, f"{name}.tmp-{dead.pid}"), "wb").close()
    generator.ensure_generated(str(tmp_path), config, workers=1)
    assert sorted(os.listdir(data_dir)) == sorted(names)


def test_an_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    config = configs.TextPopulationConfig(num_users=3, median_messages=4)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generator, "_user_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        generator.ensure_generated(str(tmp_path), config, workers=1)
    assert os.listdir(generator.cached_data_dir(str(tmp_path), config)) == []


def test_a_stop_request_abandons_the_files(tmp_path):
    config = configs.TextPopulationConfig(num_users=120, median_messages=2, seed=1)
    with pytest.raises(processes.Interrupted):
        generator.generate(config, str(tmp_path), workers=2, stop_requested=lambda: True)
    assert os.listdir(tmp_path) == []


def test_progress_counts_every_user(tmp_path):
    config = configs.TextPopulationConfig(num_users=60, median_messages=2, seed=1)
    calls = []
    generator.generate(config, str(tmp_path), workers=1, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(50, 60), (60, 60)]  # chunks of 50 users


def test_hand_encoded_example_equals_tf_train_example():
    message = generator.user_messages(TINY, 0)[1][0]
    parsed = tf.train.Example.FromString(generator.serialize_example(message))
    feature = parsed.features.feature
    assert feature["tokens"].bytes_list.value == [message["tokens"].encode()]
    assert feature["score"].int64_list.value == [message["score"]]
    assert sorted(feature) == ["creation_date", "score", "tags", "title", "tokens", "type"]


def test_word_statistics_are_real_and_zipfian():
    vocabulary, counts = words.unigrams(20_000)
    assert vocabulary[:5] == ("the", "of", "and", "to", "a")
    assert np.all(np.diff(counts) <= 0) and "porn" not in vocabulary
    # Zipf's law: count ~ rank^-s with s near 1; the least-squares slope of log count on
    # log rank over ranks 10-10,000 of these counts is about -1.
    ranks = np.arange(10, 10_000)
    slope = np.polyfit(np.log(ranks), np.log(counts[ranks - 1]), 1)[0]
    assert -1.4 < slope < -0.8
    chain = words.bigram_chain(20_000)
    of = chain.index["of"]
    assert chain.words[chain.successors[chain.offsets[of]]] == "the"  # "of the" is the most common continuation
    assert chain.next_word(of, 0.0) == chain.index["the"]
    ends = chain.cumulative[chain.offsets[1:][np.diff(chain.offsets) > 0] - 1]
    assert np.all(ends == 1.0)
    # Web spam is in the counts: a bigram of two words that mostly keep its company is left out.
    assert words.is_spam_pair("hot", "teen") and not words.is_spam_pair("hot", "coffee")
    hot = chain.index["hot"]
    after_hot = {chain.words[i] for i in chain.successors[chain.offsets[hot] : chain.offsets[hot + 1]]}
    assert "coffee" in after_hot and "teen" not in after_hot and "teen" in chain.index


def test_a_missing_word_source_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"symspellpy .* is not installed; run `make env`"):
        words.package_dir()
