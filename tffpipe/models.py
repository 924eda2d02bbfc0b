"""Pure Keras model builders and a registry by task and name (no TFF).

Every builder takes the number of outputs and returns an uncompiled `tf.keras.Model`;
`create_model` checks it against its task's contract and names what does not fit:

* emnist: float32 [batch, 28, 28, 1] -> logits [batch, num_classes];
* keyboard: int64 token ids [batch, time] -> logits [batch, time, vocab_size], where
  vocab_size counts every id the task uses (padding, words, out-of-vocabulary
  buckets, beginning and end of sentence; `tasks.keyboard.task`).

Users plug in their own as `package.module:function` with the same signature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import random
import threading
import time
from collections.abc import Callable, Mapping

import tensorflow as tf

from tffpipe import configs, errors, processes

INPUT_SHAPE = (28, 28, 1)
ModelBuilder = Callable[[int], tf.keras.Model]
# How long `check_builder` waits for a builder: the registered ones take seconds (so_lstm the
# longest); a user's may load weights, but one that takes minutes is stuck.
BUILD_TIMEOUT_S = 300.0


@contextlib.contextmanager
def seeds_kept():
    """Models built inside leave the initial weights of every later model as they would be.

    Keras 2.14 gives each unseeded initializer a seed drawn from the generator
    `tf.keras.utils.set_random_seed` installs, in creation order, so a model built only to
    inspect its layers or convert it would change the initial weights of the models built
    after it (a run's process). Inside, the draws happen; on leaving, the generator is
    back where it was. Keras keeps that generator in a private thread-local
    (`keras.src.backend._SEED_GENERATOR`, TF 2.14 as locked); without it, Python's
    `random`, which Keras falls back to, is kept instead.
    """
    from keras.src import backend  # noqa: PLC0415  (the locked Keras' internals, only here)

    generator = getattr(backend._SEED_GENERATOR, "generator", None) or random
    state = generator.getstate()
    try:
        yield
    finally:
        generator.setstate(state)


class ModelBuilderError(errors.InputError):
    """A model name or import path that does not give a usable builder."""

    field = "model"


def create_linear(num_classes: int) -> tf.keras.Model:
    """Multinomial logistic regression: 785 * num_classes parameters."""
    return tf.keras.Sequential(
        [tf.keras.layers.Flatten(input_shape=INPUT_SHAPE), tf.keras.layers.Dense(num_classes)], name="linear"
    )


def create_mlp(num_classes: int) -> tf.keras.Model:
    """The 2x200 ReLU network of McMahan et al. 2017 ('2NN')."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=INPUT_SHAPE),
            tf.keras.layers.Dense(200, activation="relu"),
            tf.keras.layers.Dense(200, activation="relu"),
            tf.keras.layers.Dense(num_classes),
        ],
        name="mlp",
    )


def create_cnn(num_classes: int) -> tf.keras.Model:
    """TFF's EMNIST CNN (`create_conv_dropout_model`): 1,206,590 parameters for 62 classes."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(32, 3, activation="relu", input_shape=INPUT_SHAPE),
            tf.keras.layers.Conv2D(64, 3, activation="relu"),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.Dropout(0.25),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dropout(0.5),
            tf.keras.layers.Dense(num_classes),
        ],
        name="cnn",
    )


def create_small_cnn(num_classes: int) -> tf.keras.Model:
    """A small, fast CNN for quick runs: 2 conv + pool blocks, about 55k parameters at 62 classes."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(16, 3, activation="relu", input_shape=INPUT_SHAPE),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.Conv2D(32, 3, activation="relu"),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(num_classes),
        ],
        name="small_cnn",
    )


def create_so_lstm(vocab_size: int) -> tf.keras.Model:
    """TFF's Stack Overflow next-word model: embedding 96, LSTM 670, dense 96, dense vocab (4,050,748 at 10,004)."""
    from tensorflow_federated.python.simulation.baselines.stackoverflow import word_prediction_models

    return word_prediction_models.create_recurrent_model(vocab_size, embedding_size=96, lstm_size=670)


@tf.keras.saving.register_keras_serializable(package="tffpipe")
class CIFGCell(tf.keras.layers.Layer):
    """A coupled input-forget gate LSTM cell with a projection (Hard et al. 2018, after Sak et al. 2014).

    The input gate is 1 - forget gate (three gates' weights instead of four), and the
    hidden state is projected to `projection` units, which is both the cell's output
    and what it feeds back.
    """

    def __init__(self, units: int, projection: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.projection = projection
        self.state_size = [projection, units]  # h (projected), c
        self.output_size = projection

    def build(self, input_shape):
        width = int(input_shape[-1]) + self.projection
        self.kernel = self.add_weight(name="kernel", shape=(width, 3 * self.units), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(3 * self.units,), initializer="zeros")
        self.projection_kernel = self.add_weight(
            name="projection", shape=(self.units, self.projection), initializer="glorot_uniform"
        )
        self.built = True

    def call(self, inputs, states):
        h, c = states
        z = tf.matmul(tf.concat([inputs, h], axis=-1), self.kernel) + self.bias
        forget_in, candidate, output_in = tf.split(z, 3, axis=-1)
        forget = tf.sigmoid(forget_in + 1.0)  # forget bias 1, as Keras' LSTM
        c = forget * c + (1.0 - forget) * tf.tanh(candidate)
        h = tf.matmul(tf.sigmoid(output_in) * tf.tanh(c), self.projection_kernel)
        return h, [h, c]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "projection": self.projection}


@tf.keras.saving.register_keras_serializable(package="tffpipe")
class TiedEmbedding(tf.keras.layers.Embedding):
    """An embedding that also gives the output logits: `layer(ids)` embeds, `layer(h, transpose=True)` scores.

    Scoring multiplies by the embedding matrix transposed (tied input and output
    embeddings) and adds a per-word bias. One layer called twice keeps the model
    serializable as a plain Keras functional model.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.output_bias = self.add_weight(name="output_bias", shape=(self.input_dim,), initializer="zeros")

    def call(self, inputs, transpose: bool = False):
        if transpose:
            return tf.matmul(inputs, self.embeddings, transpose_b=True) + self.output_bias
        return super().call(inputs)

    def compute_mask(self, inputs, mask=None):
        return mask if inputs.dtype.is_floating else super().compute_mask(inputs, mask)


def create_cifg_lstm(vocab_size: int) -> tf.keras.Model:
    """The phone-sized keyboard model of Hard et al. 2018: CIFG 670 with projection 96, tied embeddings 96.

    1,422,638 parameters at a 10,004-id vocabulary: embedding 960,384 (shared with the
    output), gates 3 x (192 x 670 + 670) = 387,930, projection 64,320, output bias 10,004.
    """
    inputs = tf.keras.layers.Input(shape=(None,), dtype=tf.int64)
    embedding = TiedEmbedding(vocab_size, 96, mask_zero=True)
    hidden = tf.keras.layers.RNN(CIFGCell(670, 96), return_sequences=True)(embedding(inputs))
    return tf.keras.Model(inputs, embedding(hidden, transpose=True), name="cifg_lstm")


def create_cifg_lstm_small(vocab_size: int) -> tf.keras.Model:
    """A cheaper keyboard model for DP at large cohorts: CIFG 256 with projection 64, tied embeddings 64.

    245,716 parameters at a 2,004-id vocabulary (`--vocab_size=2000`): embedding 128,256
    (shared with the output), gates 3 x (128 x 256 + 256) = 99,072, projection 16,384,
    output bias 2,004; about a sixth of cifg_lstm's multiply-adds per token at 10,004 ids.
    """
    inputs = tf.keras.layers.Input(shape=(None,), dtype=tf.int64)
    embedding = TiedEmbedding(vocab_size, 64, mask_zero=True)
    hidden = tf.keras.layers.RNN(CIFGCell(256, 64), return_sequences=True)(embedding(inputs))
    return tf.keras.Model(inputs, embedding(hidden, transpose=True), name="cifg_lstm_small")


REGISTRY: Mapping[configs.Task, Mapping[str, ModelBuilder]] = {
    configs.Task.EMNIST: {
        "linear": create_linear,
        "mlp": create_mlp,
        "cnn": create_cnn,
        "small_cnn": create_small_cnn,
    },
    configs.Task.KEYBOARD: {
        "cifg_lstm": create_cifg_lstm,
        "cifg_lstm_small": create_cifg_lstm_small,
        "so_lstm": create_so_lstm,
    },
}


def get_builder(name: str, task: configs.Task = configs.Task.EMNIST) -> ModelBuilder:
    """A name registered for the task, or `package.module:function` for the user's own builder."""
    if ":" not in name:
        registered = REGISTRY[task]
        if name not in registered:
            other = [t.value for t, names in REGISTRY.items() if name in names]
            hint = f" ({name!r} is a model of the {other[0]} task)" if other else ""
            raise ModelBuilderError(
                f"unknown model {name!r} for the {task.value} task{hint}; choose one of {sorted(registered)} "
                "or give package.module:function"
            )
        return registered[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelBuilderError(
            f"cannot import module {module_name!r} for model {name!r}: {e}. "
            "Is the module on PYTHONPATH (run from its parent directory)?"
        ) from e
    except Exception as e:  # noqa: BLE001  (a user's module may fail in any way while importing)
        raise ModelBuilderError(
            f"importing module {module_name!r} for model {name!r} failed: {type(e).__name__}: {_first_line(e)}"
        ) from e
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ModelBuilderError(f"module {module_name!r} has no function {attr!r} (from model {name!r})")
    return builder


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a device holds and uploads for this model."""

    name: str
    num_parameters: int
    update_bytes: int  # `weight_bytes` of the trainable weights: downloaded, and uploaded as is


def create_model(name: str, task: configs.Task, num_classes: int) -> tf.keras.Model:
    """Builds and checks a model against the task's contract (input and output shapes)."""
    try:
        model = get_builder(name, task)(num_classes)
    except ModelBuilderError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's builder may fail in any way)
        raise ModelBuilderError(
            f"model builder {name!r} failed when called with {num_classes}: "
            f"{type(e).__name__}: {_first_line(e)}. A builder takes the number of outputs and returns a tf.keras.Model"
        ) from e
    if not isinstance(model, tf.keras.Model):
        raise ModelBuilderError(f"model {name!r} returned {type(model).__name__}, not a tf.keras.Model")
    example, expected, described = _CONTRACTS[task](num_classes)
    try:
        out = model(example)
    except Exception as e:  # noqa: BLE001  (any failure here means the input does not fit)
        raise ModelBuilderError(f"model {name!r} does not accept inputs of shape {described}: {_first_line(e)}") from e
    if tuple(out.shape) != expected:
        raise ModelBuilderError(
            f"model {name!r} outputs shape {tuple(out.shape)} for an input of shape {tuple(example.shape)}; "
            f"the {task.value} task needs {expected}"
        )
    if not model.trainable_weights:
        raise ModelBuilderError(
            f"model {name!r} has no trainable weights: federated training would have nothing to train"
        )
    return model


def check_builder(
    name: str,
    task: configs.Task,
    num_classes: int,
    *,
    timeout_s: float = BUILD_TIMEOUT_S,
    stop_requested: Callable[[], bool] = lambda: False,
) -> None:
    """`create_model` once, on a thread of its own, so a user's builder cannot end, hang or interrupt the run.

    A builder is the user's code: a `sys.exit()` or `KeyboardInterrupt` inside it must not pass
    for the binary's own exit or a Ctrl-C, and one that never returns must neither hang the run
    nor ignore a stop (binaries catch SIGINT to stop after a round, so the first Ctrl-C would
    only set `stop_requested`). The thread is a daemon: a builder that never returns is left
    behind when the binary exits with the error.

    Raises:
      ModelBuilderError: the builder failed, exited or did not return within `timeout_s`, or
        its model does not fit the task.
      processes.Interrupted: `stop_requested` became true while the builder ran.
    """
    outcome: list[BaseException] = []

    def build() -> None:
        try:
            create_model(name, task, num_classes)
        except BaseException as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt are the builder's too)
            outcome.append(e)

    thread = threading.Thread(target=build, name=f"check model {name}", daemon=True)
    deadline = time.monotonic() + timeout_s
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if thread.is_alive() and stop_requested():
            raise processes.Interrupted(f"stopped while model builder {name!r} was running")
        if thread.is_alive() and time.monotonic() > deadline:
            raise ModelBuilderError(
                f"model builder {name!r} did not return within {timeout_s:g} s; "
                "a builder must return a tf.keras.Model (does it wait for something or loop forever?)"
            )
    if not outcome:
        return
    error = outcome[0]
    if isinstance(error, ModelBuilderError):
        raise error
    what = f"called sys.exit({error.code!r})" if isinstance(error, SystemExit) else f"raised {type(error).__name__}"
    raise ModelBuilderError(
        f"model builder {name!r} {what} when imported or called with {num_classes}; "
        "a builder must return a tf.keras.Model"
    ) from error


def _image_contract(num_classes: int):
    return tf.zeros((1, *INPUT_SHAPE)), (1, num_classes), "[batch, 28, 28, 1]"


def _text_contract(vocab_size: int):
    # Token ids of one 3-token sequence; logits for every position.
    return tf.constant([[1, 2, 0]], tf.int64), (1, 3, vocab_size), "[batch, time] (int64 token ids)"


_CONTRACTS = {configs.Task.EMNIST: _image_contract, configs.Task.KEYBOARD: _text_contract}


def weight_bytes(weights) -> int:
    """Bytes of float32 weights (or of their specs): what a device downloads, and uploads unencoded."""
    return sum(4 * int(tf.TensorShape(w.shape).num_elements()) for w in weights)


def describe(name: str, model: tf.keras.Model) -> ModelInfo:
    return ModelInfo(name=name, num_parameters=model.count_params(), update_bytes=weight_bytes(model.trainable_weights))
