"""The keyboard task's learning side: TFF's token ids, masked metrics and loss on hand-made examples."""

import math
import os
import sqlite3

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import configs, models
from tffpipe.data import example_proto, sql_files
from tffpipe.tasks.keyboard import files, task

# Vocabulary of 8 words and 1 out-of-vocabulary bucket: pad 0, words 1-8, OOV 9, BOS 10, EOS 11.
TEXT = configs.TextConfig(vocab_size=8, sequence_length=5, num_oov_buckets=1)
VOCAB = ["i", "am", "on", "my", "way", "see", "you", "."]


def test_special_tokens_are_tffs():
    tokens = task.special_tokens(TEXT)
    assert (tokens.padding, tokens.out_of_vocab, tokens.beginning_of_sentence, tokens.end_of_sentence) == (
        0,
        [9],
        10,
        11,
    )
    assert task.masked_for_accuracy(TEXT) == [0, 11, 9]


def test_messages_become_tffs_shifted_id_sequences():
    rows = tf.data.Dataset.from_tensor_slices(
        [
            example_proto.encode_example({"tokens": [b"i am on my way"]}),
            example_proto.encode_example({"tokens": [b"see you zebra"]}),
        ]
    )
    batches = list(task.create_eval_fn(TEXT, VOCAB)(rows))
    x, y = (b.numpy() for b in batches[0])
    # "i am on my way": BOS i am on my way (5 words = sequence_length, so no EOS), x the first 5, y the next 5.
    np.testing.assert_array_equal(x[0], [10, 1, 2, 3, 4])
    np.testing.assert_array_equal(y[0], [1, 2, 3, 4, 5])
    # "see you zebra": zebra is out of vocabulary (9), then EOS (11) and padding.
    np.testing.assert_array_equal(x[1], [10, 6, 7, 9, 11])
    np.testing.assert_array_equal(y[1], [6, 7, 9, 11, 0])


def test_training_order_is_seeded():
    rows = tf.data.Dataset.from_tensor_slices(
        [example_proto.encode_example({"tokens": [f"{w} {w}".encode()]}) for w in VOCAB]
    )
    preprocess = configs.PreprocessConfig(epochs=1, batch_size=8, shuffle_buffer=8)

    def order(seed):
        return [b[0].numpy()[:, 1].tolist() for b in task.create_train_fn(TEXT, preprocess, VOCAB, seed=seed)(rows)]

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)[0]) == list(range(1, 9))


def _logits(best: list[list[int]], second: list[list[int]], third: list[list[int]], vocab: int = 12) -> np.ndarray:
    logits = np.zeros((len(best), len(best[0]), vocab), np.float32)
    for b, row in enumerate(best):
        for t, token in enumerate(row):
            logits[b, t, token] = 3.0
            logits[b, t, second[b][t]] = 2.0
            logits[b, t, third[b][t]] = 1.0
    return logits


def test_accuracy_and_top3_count_only_real_words():
    y = np.array([[1, 2, 9, 11, 0]])  # word, word, OOV, EOS, pad: only the first two count
    logits = _logits(best=[[1, 5, 9, 11, 0]], second=[[4, 6, 8, 3, 3]], third=[[6, 2, 3, 4, 4]])
    metrics = task.create_metrics(TEXT)
    for name in ("accuracy", "top3_accuracy"):
        metrics[name].update_state(y, logits)
    # Position 0: right at rank 1. Position 1: target 2 at rank 3. Accuracy 1/2; top-3 2/2.
    assert metrics["accuracy"].result().numpy() == pytest.approx(0.5)
    assert metrics["top3_accuracy"].result().numpy() == pytest.approx(1.0)


def test_the_loss_and_perplexity_average_over_real_tokens_only():
    y = np.array([[1, 2, 0, 0]])
    logits = np.random.default_rng(0).normal(size=(1, 4, 12)).astype(np.float32)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(log_softmax[0, 0, 1] + log_softmax[0, 1, 2]) / 2  # two real tokens; padding ignored
    assert task.MaskedCrossEntropy()(y, logits).numpy() == pytest.approx(expected, rel=1e-5)
    metrics = task.create_metrics(TEXT)
    metrics["loss"].update_state(y, logits)
    metrics["perplexity"].update_state(y, logits)
    assert metrics["loss"].result().numpy() == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"].result().numpy() == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize(
    "name, parameters",
    [
        # Embedding 10,004 x 96 (tied) + gates 3 x (192 x 670 + 670) + projection 670 x 96 + output bias 10,004.
        ("cifg_lstm", 960_384 + 387_930 + 64_320 + 10_004),
        # TFF's model: embedding 960,384 + LSTM 4 x (96 + 670 + 1) x 670 + dense 96 x 671 + dense 97 x 10,004.
        ("so_lstm", 960_384 + 2_055_560 + 64_416 + 970_388),
    ],
)
def test_keyboard_models_have_their_papers_sizes(name, parameters):
    model = models.create_model(name, configs.Task.KEYBOARD, 10_004)
    assert model.count_params() == parameters
    assert model(tf.constant([[10, 4, 0]], tf.int64)).shape == (1, 3, 10_004)


def test_an_image_model_is_refused_for_text():
    with pytest.raises(models.ModelBuilderError, match="'small_cnn' is a model of the emnist task"):
        models.create_model("small_cnn", configs.Task.KEYBOARD, 12)
    with pytest.raises(models.ModelBuilderError, match=r"does not accept inputs of shape \[batch, time\]"):
        models.create_model("tffpipe.models:create_small_cnn", configs.Task.KEYBOARD, 12)


def test_a_hand_written_stack_overflow_file_passes_tffs_loader_and_tffpipes_check(tmp_path):
    path = str(tmp_path / files.FILE_NAME)
    con = sqlite3.connect(path)
    sql_files.create_layout(con)
    for split, client, text in [
        ("train", "alice", b"hi bob , on my way ."),
        ("train", "bob", b"see you soon !"),
        ("heldout", "alice", b"thanks ."),
        ("test", "bob", b"on my way ."),
    ]:
        blob = example_proto.encode_example(
            {
                "tokens": [text],
                "title": [b""],
                "tags": [b"chat"],
                "creation_date": [b"2018-01-01 09:00:00 UTC"],
                "score": [0],
                "type": [b"answer"],
            }
        )
        con.execute("INSERT INTO examples VALUES (?, ?, ?)", (split, client, blob))
        con.execute("INSERT INTO client_metadata VALUES (?, ?, 1)", (client, split))
    con.commit()
    con.close()
    with open(os.path.join(tmp_path, files.WORD_COUNT_FILE), "w") as f:
        f.write("on\t2\nmy\t2\nway\t2\n.\t2\n")
    assert files.check_database(path) == {"train": 2, "heldout": 1, "test": 1}
    files.check_word_counts(os.path.join(tmp_path, files.WORD_COUNT_FILE), vocab_size=3)
    train, _, test = tff.simulation.datasets.stackoverflow.load_data(cache_dir=str(tmp_path))
    element = next(iter(train.create_tf_dataset_for_client("alice")))
    assert element["tokens"].numpy() == b"hi bob , on my way ." and element["score"].dtype == tf.int64
    assert test.client_ids == ["bob"]
