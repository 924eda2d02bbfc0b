"""Pure Keras model builders and a registry by task and name (no TFF).

EMNIST builders take the number of classes and return an uncompiled `tf.keras.Model`
mapping float32 [batch, 28, 28, 1] to logits [batch, num_classes]. Users plug in
their own as `package.module:function` with the same signature; `create_model`
checks a builder against its task's contract and names what does not fit.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping

import tensorflow as tf

from tffpipe import configs

INPUT_SHAPE = (28, 28, 1)
ModelBuilder = Callable[[int], tf.keras.Model]


class ModelBuilderError(ValueError):
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


REGISTRY: Mapping[configs.Task, Mapping[str, ModelBuilder]] = {
    configs.Task.EMNIST: {
        "linear": create_linear,
        "mlp": create_mlp,
        "cnn": create_cnn,
        "small_cnn": create_small_cnn,
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
    update_bytes: int  # float32 trainable weights: what one client uploads per round


def create_model(name: str, task: configs.Task, num_classes: int) -> tf.keras.Model:
    """Builds and checks a model against the task's contract (input and output shapes)."""
    try:
        model = get_builder(name, task)(num_classes)
    except ModelBuilderError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's builder may fail in any way)
        raise ModelBuilderError(
            f"model builder {name!r} failed when called with num_classes={num_classes}: "
            f"{type(e).__name__}: {_first_line(e)}. A builder takes the number of classes and returns a tf.keras.Model"
        ) from e
    if not isinstance(model, tf.keras.Model):
        raise ModelBuilderError(f"model {name!r} returned {type(model).__name__}, not a tf.keras.Model")
    try:
        out = model(tf.zeros((1, *INPUT_SHAPE)))
    except Exception as e:  # noqa: BLE001  (any failure here means the input does not fit)
        raise ModelBuilderError(
            f"model {name!r} does not accept inputs of shape [batch, 28, 28, 1]: {_first_line(e)}"
        ) from e
    if tuple(out.shape) != (1, num_classes):
        raise ModelBuilderError(
            f"model {name!r} outputs shape {tuple(out.shape[1:])} per example; the task needs ({num_classes},) logits"
        )
    return model


def describe(name: str, model: tf.keras.Model) -> ModelInfo:
    trainable = sum(int(tf.size(w)) for w in model.trainable_weights)
    return ModelInfo(name=name, num_parameters=model.count_params(), update_bytes=4 * trainable)
