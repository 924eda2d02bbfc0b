"""Next-word prediction on each user's own text, with TFF's Stack Overflow baseline pieces.

Messages become token ids exactly as TFF's Stack Overflow baseline makes them
(`word_prediction_preprocessing`): the `vocab_size` most used words get ids 1..V,
out-of-vocabulary words share `num_oov_buckets` hashed ids, each message is cut to
`sequence_length` words, gets beginning- and end-of-sentence ids and is padded with 0;
x is a sequence, y the same shifted by one. What tffpipe adds:

* seeded shuffling (TFF's `create_preprocess_fn` shuffles without a seed, which a
  resumed run could not replay): rows are shuffled with the run's seed first, and
  TFF's own shuffle is off;
* a loss over real tokens only: the mask Keras builds from padding does not survive
  TFF's traced calls, so the cross-entropy would average over padding too (measured:
  TFF's loss equals the mean over every position). `MaskedCrossEntropy` weights each
  position by `y != pad` and divides by the real tokens;
* the keyboard's metrics: `accuracy` over real words (padding, end of sentence and
  out-of-vocabulary targets masked, TFF's `MaskedCategoricalAccuracy`, as its
  "accuracy without out of vocab or end of sentence"), `top3_accuracy` (a keyboard
  shows three suggestions) on the same tokens, `perplexity` (exp of the loss), and
  TFF's `num_tokens`.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.simulation.baselines import keras_metrics
from tensorflow_federated.python.simulation.baselines.stackoverflow import word_prediction_preprocessing

from tffpipe import configs, models
from tffpipe.tasks import base
from tffpipe.tasks.keyboard import files

EVAL_BATCH_SIZE = 100


def special_tokens(config: configs.TextConfig):
    """TFF's ids: padding 0, out-of-vocabulary V+1.., beginning and end of sentence last."""
    return word_prediction_preprocessing.get_special_tokens(config.vocab_size, config.num_oov_buckets)


def masked_for_accuracy(config: configs.TextConfig) -> list[int]:
    """Targets a keyboard cannot or need not predict: padding, end of sentence, out of vocabulary."""
    tokens = special_tokens(config)
    return [tokens.padding, tokens.end_of_sentence, *tokens.out_of_vocab]


def _parse_tokens(serialized):
    return tf.io.parse_single_example(serialized, {"tokens": tf.io.FixedLenFeature([], tf.string)})


def create_train_fn(config: configs.TextConfig, preprocess: configs.PreprocessConfig, vocab: list[str], *, seed: int):
    """Rows -> shuffled (seeded), repeated, capped token-id batches: TFF's pipeline after our shuffle."""
    spec = tff.simulation.baselines.ClientSpec(
        num_epochs=preprocess.epochs,
        batch_size=preprocess.batch_size,
        max_elements=preprocess.max_examples_per_client if preprocess.max_examples_per_client > 0 else None,
        shuffle_buffer_size=1,  # shuffled here, with a seed
    )
    to_batches = word_prediction_preprocessing.create_preprocess_fn(
        spec, vocab, config.sequence_length, config.num_oov_buckets, num_parallel_calls=1
    )

    def preprocess_fn(rows: tf.data.Dataset) -> tf.data.Dataset:
        if preprocess.shuffle_buffer > 1:
            rows = rows.shuffle(preprocess.shuffle_buffer, seed=seed)
        return to_batches(rows.map(_parse_tokens))

    return preprocess_fn


def create_eval_fn(config: configs.TextConfig, vocab: list[str]):
    spec = tff.simulation.baselines.ClientSpec(num_epochs=1, batch_size=EVAL_BATCH_SIZE, shuffle_buffer_size=1)
    to_batches = word_prediction_preprocessing.create_preprocess_fn(
        spec, vocab, config.sequence_length, config.num_oov_buckets, num_parallel_calls=1
    )
    return lambda rows: to_batches(rows.map(_parse_tokens))


class MaskedCrossEntropy(tf.keras.losses.Loss):
    """Sparse cross-entropy from logits over the positions whose target is not padding.

    Keras reduces a loss by the mean over all B*T positions, so each position's loss is
    scaled by B*T / (real tokens) where it is real and 0 where it is padding: the mean
    is then the mean over real tokens.
    """

    def __init__(self, pad: int = 0, name: str = "masked_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self._pad = pad

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, tf.int64)
        per_token = tf.keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        mask = tf.cast(tf.not_equal(y_true, self._pad), per_token.dtype)
        positions = tf.cast(tf.size(mask), per_token.dtype)
        return per_token * mask * positions / tf.maximum(tf.reduce_sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "pad": self._pad}


class MaskedMeanCrossEntropy(tf.keras.metrics.Mean):
    """The mean cross-entropy over real tokens (the loss, as a metric that sums across clients)."""

    def __init__(self, pad: int = 0, name: str = "loss", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self._pad = pad

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(y_true, tf.int64)
        per_token = tf.keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        mask = tf.cast(tf.not_equal(y_true, self._pad), per_token.dtype)
        return super().update_state(per_token, sample_weight=mask)

    def get_config(self):
        return {**super().get_config(), "pad": self._pad}


class Perplexity(MaskedMeanCrossEntropy):
    """exp(mean cross-entropy over real tokens)."""

    def __init__(self, pad: int = 0, name: str = "perplexity", dtype=None):
        super().__init__(pad=pad, name=name, dtype=dtype)

    def result(self):
        return tf.exp(super().result())


class MaskedTopKAccuracy(tf.keras.metrics.SparseTopKCategoricalAccuracy):
    """The target is among the k highest logits, over unmasked targets (TFF has no top-k for text)."""

    def __init__(self, k: int = 3, masked_tokens=None, name: str = "top3_accuracy", dtype=None):
        self._masked_tokens = list(masked_tokens or [])
        super().__init__(k=k, name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        weight = tf.ones_like(y_true, self._dtype) if sample_weight is None else tf.cast(sample_weight, self._dtype)
        for token in self._masked_tokens:
            weight *= tf.cast(tf.not_equal(y_true, token), self._dtype)
        classes = tf.shape(y_pred)[-1]
        return super().update_state(
            tf.reshape(y_true, [-1]), tf.reshape(y_pred, [-1, classes]), tf.reshape(weight, [-1])
        )

    def get_config(self):
        return {**super().get_config(), "masked_tokens": tuple(self._masked_tokens)}


def create_metrics(config: configs.TextConfig) -> collections.OrderedDict:
    """Fresh metrics, `loss` first (see `base.Task.metrics_fn`)."""
    pad = special_tokens(config).padding
    masked = masked_for_accuracy(config)
    return collections.OrderedDict(
        loss=MaskedMeanCrossEntropy(pad),
        accuracy=keras_metrics.MaskedCategoricalAccuracy(masked_tokens=masked, name="accuracy"),
        top3_accuracy=MaskedTopKAccuracy(3, masked_tokens=masked),
        perplexity=Perplexity(pad),
        num_tokens=keras_metrics.NumTokensCounter(masked_tokens=[pad]),
    )


def create_task(config: configs.ExperimentConfig, data: files.KeyboardData, data_dir: str) -> base.Task:
    text = config.data.text
    vocab = files.read_vocabulary(data_dir, text.vocab_size)
    train, test = data.load(data_dir)
    train_data = train.preprocess(create_train_fn(text, config.preprocess, vocab, seed=config.seed))
    test_data = test.preprocess(create_eval_fn(text, vocab))
    model = models.create_model(config.model, configs.Task.KEYBOARD, data.num_classes)  # raises ModelBuilderError

    def sample_texts(sample_seed: int, clients: int = 4, per_client: int = 6) -> dict[str, np.ndarray]:
        """A few held-out users' messages, as they typed them."""
        rng = np.random.default_rng([sample_seed, 0x7E47])
        ids = rng.choice(test.client_ids, size=min(clients, len(test.client_ids)), replace=False)
        texts = {}
        for cid in sorted(ids):
            rows = test.create_tf_dataset_for_client(cid).take(per_client).map(_parse_tokens)
            texts[cid] = np.array([row["tokens"].numpy().decode("utf-8") for row in rows])
        return texts

    return base.Task(
        kind=configs.Task.KEYBOARD,
        train_data=train_data,
        test_data=test_data,
        model_name=config.model,
        model_info=models.describe(config.model, model),
        num_classes=data.num_classes,
        loss_fn=lambda: MaskedCrossEntropy(special_tokens(text).padding),
        metrics_fn=lambda: create_metrics(text),
        sample_fn=sample_texts,
    )
