import numpy as np
import pytest
import tensorflow as tf

from tffpipe import configs
from tffpipe.tasks.emnist import files as emnist_files
from tffpipe.tasks.emnist import task as emnist_task


@pytest.fixture(scope="module")
def rows_and_parsed(tiny_data_dir):
    rows, _ = emnist_files.load_client_rows(tiny_data_dir)
    parsed, _ = emnist_files.load_client_data(tiny_data_dir)
    return rows, parsed


def _batches(client_data, fn, cid):
    return list(client_data.preprocess(fn).create_tf_dataset_for_client(cid).as_numpy_iterator())


def test_rows_and_parsed_elements_give_the_same_batches(rows_and_parsed):
    rows, parsed = rows_and_parsed
    cid = rows.client_ids[0]
    for fn in (
        emnist_task.create_train_fn(configs.PreprocessConfig(epochs=2, batch_size=5, shuffle_buffer=10), seed=0),
        emnist_task.create_eval_fn(7),
    ):
        from_rows, from_parsed = _batches(rows, fn, cid), _batches(parsed, fn, cid)
        assert len(from_rows) == len(from_parsed) > 1
        for a, b in zip(from_rows, from_parsed, strict=True):
            np.testing.assert_array_equal(a["x"], b["x"])
            np.testing.assert_array_equal(a["y"], b["y"])


def test_batches_hold_ink_and_labels_in_the_models_shapes(rows_and_parsed):
    rows, parsed = rows_and_parsed
    cid = rows.client_ids[0]
    element = next(iter(parsed.create_tf_dataset_for_client(cid)))
    batch = _batches(rows, emnist_task.create_eval_fn(4), cid)[0]
    assert batch["x"].shape == (4, 28, 28, 1) and batch["x"].dtype == np.float32
    assert batch["y"].shape == (4, 1) and batch["y"].dtype == np.int32
    np.testing.assert_allclose(batch["x"][0, :, :, 0], 1.0 - element["pixels"].numpy())  # 1.0 = ink
    assert batch["y"][0, 0] == element["label"]


def test_epochs_cap_and_seeded_shuffle(rows_and_parsed):
    rows, _ = rows_and_parsed
    cid = rows.client_ids[0]
    n = len(list(rows.create_tf_dataset_for_client(cid)))

    def labels(**kw):
        seed = kw.pop("seed", 0)
        fn = emnist_task.create_train_fn(configs.PreprocessConfig(batch_size=3, **{"epochs": 1, **kw}), seed=seed)
        return np.concatenate([b["y"][:, 0] for b in _batches(rows, fn, cid)])

    assert len(labels(epochs=3, shuffle_buffer=1)) == 3 * n
    assert len(labels(max_examples_per_client=5, shuffle_buffer=1)) == 5
    np.testing.assert_array_equal(labels(seed=1), labels(seed=1))
    assert sorted(labels(seed=1)) == sorted(labels(shuffle_buffer=1))
    assert not np.array_equal(labels(seed=1), labels(shuffle_buffer=1))


def test_client_datasets_skip_tf_data_rewrites():
    """Per-client iterators must not run tf.data's graph rewrites or autotuning (issue 6)."""
    rows = tf.data.Dataset.from_tensors(tf.constant(b"")).repeat(0)
    for fn in (emnist_task.create_train_fn(configs.PreprocessConfig(), seed=0), emnist_task.create_eval_fn()):
        options = fn(rows).options()
        assert options.experimental_optimization.apply_default_optimizations is False
        assert options.autotune.enabled is False


def _dataset_ops(dataset: tf.data.Dataset) -> tuple[set[str], int]:
    graph = tf.compat.v1.GraphDef.FromString(tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor).numpy())
    return {node.op for node in graph.node}, len(graph.library.function)


def test_client_datasets_need_no_tf_data_functions(rows_and_parsed):
    """tf.data instantiates a map's function for every iterator: every client, every round (issue 6)."""
    rows, _ = rows_and_parsed
    cid = rows.client_ids[0]
    for fn in (emnist_task.create_train_fn(configs.PreprocessConfig(epochs=2), seed=0), emnist_task.create_eval_fn()):
        ops, functions = _dataset_ops(fn(rows.serializable_dataset_fn(cid)))
        assert functions == 0 and not any("Map" in op for op in ops), ops


def test_a_client_without_examples_gives_no_batches():
    rows = tf.data.Dataset.from_tensors(tf.constant(b"")).repeat(0)
    for fn in (emnist_task.create_train_fn(configs.PreprocessConfig(), seed=0), emnist_task.create_eval_fn()):
        assert list(fn(rows)) == []
