import errno
import hashlib
import os
import sqlite3
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.simulation.datasets import emnist as tff_emnist

from tests import conftest
from tffpipe import processes
from tffpipe.data import sql_files
from tffpipe.tasks.emnist import files as emnist_files
from tffpipe.tasks.emnist import generator


def _db(data_dir: str) -> str:
    return os.path.join(data_dir, emnist_files.FILE_NAME)


def _digest(path: str) -> str:
    con = sqlite3.connect(path)
    h = hashlib.sha256()
    for row in con.execute("SELECT split_name, client_id, serialized_example_proto FROM examples ORDER BY rowid"):
        h.update(repr(row).encode())
    con.close()
    return h.hexdigest()


def test_generated_file_round_trips_through_tffs_own_sql_client_data(tiny_data_dir):
    # TFF's loader: SqlClientData on the split, then TFF's own proto parsing.
    train = tff.simulation.datasets.SqlClientData(_db(tiny_data_dir), "all_train").preprocess(
        tff_emnist._add_proto_parsing
    )
    assert train.client_ids == [generator.writer_id(i) for i in range(conftest.TINY.num_writers)]
    element = next(iter(train.create_tf_dataset_for_client(train.client_ids[0])))
    assert element["pixels"].shape == (28, 28) and element["pixels"].dtype == tf.float32
    assert element["label"].dtype == tf.int32 and 0 <= int(element["label"]) < 62
    pixels = element["pixels"].numpy()
    # TFF-EMNIST convention: 1.0 is background (most pixels), 0.0 is ink.
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert np.median(pixels) > 0.9 and pixels.min() < 0.2


def test_population_size_is_known_before_generating(tiny_data_dir):
    counts = emnist_files.check_database(_db(tiny_data_dir), only_digits=True)
    assert generator.train_clients(conftest.TINY, only_digits=True) == counts["digits_only_train"]
    assert generator.train_clients(conftest.TINY, only_digits=False) == conftest.TINY.num_writers


def test_hand_encoded_example_equals_tf_train_example():
    pixels = np.random.default_rng(0).random((28, 28), dtype=np.float32)
    ours = generator.serialize_example(pixels, 37)
    parsed = tf.train.Example.FromString(ours)
    assert list(parsed.features.feature["label"].int64_list.value) == [37]
    np.testing.assert_array_equal(
        np.array(parsed.features.feature["pixels"].float_list.value, np.float32), pixels.ravel()
    )


def test_digits_only_splits_hold_exactly_the_digit_examples(tiny_data_dir):
    con = sqlite3.connect(_db(tiny_data_dir))
    for part in ("train", "test"):
        digits = con.execute(f"SELECT COUNT(*) FROM examples WHERE split_name='digits_only_{part}'").fetchone()[0]
        rows = con.execute(f"SELECT serialized_example_proto FROM examples WHERE split_name='all_{part}'").fetchall()
        labels = [tf.train.Example.FromString(r[0]).features.feature["label"].int64_list.value[0] for r in rows]
        assert digits == sum(label < 10 for label in labels)
    con.close()


def test_same_seed_gives_identical_data_and_another_seed_does_not(tmp_path):
    config = generator.PopulationConfig(num_writers=3, median_examples=8, seed=1)
    generator.generate(config, str(tmp_path / "a.sqlite"), workers=1)
    generator.generate(config, str(tmp_path / "b.sqlite"), workers=2)  # worker processes give the same bytes
    other = generator.PopulationConfig(num_writers=3, median_examples=8, seed=2)
    generator.generate(other, str(tmp_path / "c.sqlite"), workers=1)
    assert _digest(str(tmp_path / "a.sqlite")) == _digest(str(tmp_path / "b.sqlite"))
    assert _digest(str(tmp_path / "a.sqlite")) != _digest(str(tmp_path / "c.sqlite"))


def _ink_and_slant(style: generator.WriterStyle, seed: int, n: int = 12) -> np.ndarray:
    """Per-example (ink mass, horizontal centroid shift top vs bottom) for the digit '1'."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        ink = 1.0 - generator.render_example(1, style, rng)
        cols = np.arange(28)
        top, bottom = ink[:14], ink[14:]
        shift = (top.sum(0) @ cols) / max(top.sum(), 1e-6) - (bottom.sum(0) @ cols) / max(bottom.sum(), 1e-6)
        stats.append((ink.sum(), shift))
    return np.array(stats)


def test_writers_differ_more_between_than_within_in_style_statistics():
    per_writer = [_ink_and_slant(generator.sample_style(np.random.default_rng([3, w])), w) for w in range(8)]
    n = len(per_writer[0])
    between = np.array([s.mean(0) for s in per_writer]).var(0, ddof=1)
    within = np.mean([s.var(0, ddof=1) for s in per_writer], axis=0)
    # One-way ANOVA F = n * var(writer means) / mean within-writer variance; ~1 if writers
    # did not matter. Pen width drives ink mass, slant the top/bottom shift.
    f_ink, f_slant = n * between / within
    assert f_ink > 5 and f_slant > 5


def _label_entropy_and_sizes(config: generator.PopulationConfig) -> tuple[float, float]:
    """Mean entropy of the writers' label distributions, and the coefficient of variation of their sizes."""
    entropies, sizes = [], []
    for i in range(config.num_writers):
        plan = generator.writer_plan(config, i)  # the draws the generator renders from
        sizes.append(len(plan.labels))
        p = plan.class_probs
        entropies.append(-(p * np.log(np.maximum(p, 1e-12))).sum())
    return float(np.mean(entropies)), float(np.std(sizes) / np.mean(sizes))


def test_skew_parameters_have_their_measured_effect():
    skewed, _ = _label_entropy_and_sizes(generator.PopulationConfig(num_writers=200, label_concentration=0.05))
    iid, _ = _label_entropy_and_sizes(generator.PopulationConfig(num_writers=200, label_concentration=100.0))
    # Uniform over 62 classes has entropy ln 62 = 4.13; near-IID writers approach the prior's entropy.
    assert iid > 3.9 and skewed < 2.5
    _, cv_equal = _label_entropy_and_sizes(generator.PopulationConfig(num_writers=200, quantity_sigma=0.0))
    _, cv_heavy = _label_entropy_and_sizes(generator.PopulationConfig(num_writers=200, quantity_sigma=1.0))
    assert cv_equal == 0.0 and cv_heavy > 0.7


def test_label_skew_shows_in_the_written_file(tmp_path):
    config = generator.PopulationConfig(num_writers=4, median_examples=60, label_concentration=0.02, seed=3)
    generator.generate(config, str(tmp_path / "s.sqlite"), workers=1)
    con = sqlite3.connect(str(tmp_path / "s.sqlite"))
    rows = con.execute("SELECT client_id, serialized_example_proto FROM examples WHERE split_name='all_train'")
    labels: dict[str, set] = {}
    for cid, blob in rows:
        labels.setdefault(cid, set()).add(
            tf.train.Example.FromString(blob).features.feature["label"].int64_list.value[0]
        )
    # With concentration 0.02 a writer's labels concentrate on a few of the 62 classes.
    assert all(len(v) <= 12 for v in labels.values())


def test_interrupted_generation_leaves_nothing_that_loads(tmp_path, monkeypatch):
    config = generator.PopulationConfig(num_writers=3, median_examples=8)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generator, "_writer_examples", crash)
    with pytest.raises(KeyboardInterrupt):
        generator.ensure_generated(str(tmp_path), config, workers=1)
    data_dir = generator.cached_data_dir(str(tmp_path), config)
    assert not os.path.exists(_db(data_dir)) and os.listdir(data_dir) == []
    with pytest.raises(emnist_files.DataFileError, match="not found"):
        emnist_files.load_client_data(data_dir)


def test_different_config_gets_its_own_file_and_a_mismatched_file_is_regenerated(tmp_path):
    a = generator.PopulationConfig(num_writers=2, median_examples=6, seed=1)
    b = generator.PopulationConfig(num_writers=2, median_examples=6, seed=2)
    dir_a = generator.ensure_generated(str(tmp_path), a, workers=1)
    dir_b = generator.ensure_generated(str(tmp_path), b, workers=1)
    assert dir_a != dir_b
    assert generator.read_config(_db(dir_a)) == a
    # A file whose recorded config does not match its directory is never reused.
    os.replace(_db(dir_b), _db(dir_a))
    assert generator.ensure_generated(str(tmp_path), a, workers=1) == dir_a
    assert generator.read_config(_db(dir_a)) == a


def test_a_crashed_generations_temporary_file_is_removed_on_the_next_start(tmp_path):
    config = generator.PopulationConfig(num_writers=2, median_examples=6, seed=1)
    data_dir = generator.cached_data_dir(str(tmp_path), config)
    os.makedirs(data_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = os.path.join(data_dir, f"{emnist_files.FILE_NAME}.tmp-{dead.pid}")
    open(leftover, "wb").close()
    generator.ensure_generated(str(tmp_path), config, workers=1)
    assert sorted(os.listdir(data_dir)) == [emnist_files.FILE_NAME]


def test_progress_counts_every_writer(tmp_path):
    config = generator.PopulationConfig(num_writers=60, median_examples=2, min_examples=2, seed=1)
    calls = []
    generator.generate(config, str(tmp_path / "p.sqlite"), workers=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(50, 60), (60, 60)]  # chunks of 50 writers


def test_a_stop_request_abandons_the_file(tmp_path):
    config = generator.PopulationConfig(num_writers=120, median_examples=2, min_examples=2, seed=1)
    with pytest.raises(processes.Interrupted):
        generator.generate(config, str(tmp_path / "s.sqlite"), workers=2, stop_requested=lambda: True)
    assert os.listdir(tmp_path) == []


def test_a_cache_that_cannot_be_written_is_named_and_one_already_generated_is_only_read(
    tmp_path, tiny_data_dir, monkeypatch
):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(sql_files.CacheDirError, match=r"cannot create .*a_file/embedded-\w+ to generate") as e:
        generator.ensure_generated(str(blocker), conftest.TINY, workers=1)
    assert e.value.field == "data.cache_dir" and "(Not a directory); give a writable cache_dir" in str(e.value)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "makedirs", read_only)  # a read-only file system holding the generated data
    assert generator.ensure_generated(os.path.dirname(tiny_data_dir), conftest.TINY) == tiny_data_dir
