import sys
import threading
import time

import pytest
import tensorflow as tf

from tffpipe import configs, models, processes

EMNIST = configs.Task.EMNIST


def returns_a_string(num_classes):
    return "not a model"


def wrong_output(num_classes):
    return tf.keras.Sequential(
        [tf.keras.layers.Flatten(input_shape=(28, 28, 1)), tf.keras.layers.Dense(num_classes + 1)]
    )


class _DenseNanWhenFar(tf.keras.layers.Dense):
    """A dense layer whose outputs turn NaN once its kernel's norm passes `limit`."""

    def __init__(self, units: int, limit: float, **kwargs):
        super().__init__(units, **kwargs)
        self.limit = limit

    def call(self, inputs):
        logits = super().call(inputs)
        # NaN not computed from the logits: `logits * nan` would make their gradient NaN in every round.
        return tf.where(tf.norm(self.kernel) > self.limit, tf.fill(tf.shape(logits), float("nan")), logits)

    def get_config(self):
        return {**super().get_config(), "limit": self.limit}


def nan_after_three_rounds(num_classes):
    """Fits the task; its logits turn NaN once the kernel's norm passes 17.3 (the NaN-loss e2e test).

    The kernel starts at zero and, with the e2e tests' seeded DP noise (std z*C/m = 0.3 * 0.5 / 3
    = 0.05 on each of 784 * 62 = 48,608 weights, far above the clipped updates), its norm after r
    rounds is about 0.05 * sqrt(48,608 r) = 11.0 sqrt(r): 15.6 after round 2, 19.1 after round 3
    (19.16 measured). So rounds 1-3 train from finite logits and every client of round 4 gets NaN.
    """
    return tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(28, 28, 1)),
            _DenseNanWhenFar(num_classes, limit=17.3, kernel_initializer="zeros"),
        ]
    )


def raises(num_classes):
    raise RuntimeError("out of ideas")


def takes_nothing():
    return None


def wrong_input(num_classes):
    return tf.keras.Sequential([tf.keras.layers.Dense(num_classes, input_shape=(10,))])


def exits(num_classes):
    sys.exit(0)


def interrupts(num_classes):
    raise KeyboardInterrupt


def never_returns(num_classes):
    threading.Event().wait()


def no_weights(num_classes):
    """Fits the emnist contract (logits [batch, num_classes]) with nothing to train."""
    return tf.keras.Sequential(
        [tf.keras.layers.Flatten(input_shape=(28, 28, 1)), tf.keras.layers.Lambda(lambda x: x[:, :num_classes])]
    )


@pytest.mark.parametrize(
    "name, num_classes, parameters",
    [
        ("linear", 62, 785 * 62),  # 784 weights + 1 bias per class
        ("mlp", 62, 785 * 200 + 201 * 200 + 201 * 62),
        ("cnn", 62, 1_206_590),  # TFF's EMNIST CNN: 320 + 18,496 + 1,179,776 + 7,998
        ("small_cnn", 62, 160 + 4_640 + 801 * 62),
        ("small_cnn", 10, 160 + 4_640 + 801 * 10),
    ],
)
def test_every_registered_model_builds_with_its_parameter_count(name, num_classes, parameters):
    model = models.create_model(name, EMNIST, num_classes)
    info = models.describe(name, model)
    assert info.num_parameters == parameters
    assert info.update_bytes == 4 * parameters  # every weight is trainable float32
    assert set(models.REGISTRY[EMNIST]) == {"linear", "mlp", "cnn", "small_cnn"}


@pytest.mark.parametrize(
    "name, vocab, parameters",
    [
        # tied embedding + output bias (vocab x (96 + 1)), gates 3 x (192 x 670 + 670), projection 670 x 96
        ("cifg_lstm", 10_004, 10_004 * 97 + 3 * (192 * 670 + 670) + 670 * 96),
        # the same at width 64 / 256: vocab x 65, 3 x (128 x 256 + 256), 256 x 64
        ("cifg_lstm_small", 2_004, 2_004 * 65 + 3 * (128 * 256 + 256) + 256 * 64),
    ],
)
def test_keyboard_models_build_with_their_parameter_count(name, vocab, parameters):
    model = models.create_model(name, configs.Task.KEYBOARD, vocab)
    assert models.describe(name, model).num_parameters == parameters
    assert model(tf.zeros([2, 5], tf.int64)).shape == (2, 5, vocab)  # logits per position over the ids


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        models.ModelBuilderError, match=r"unknown model 'resnet' for the emnist task; choose one of \['cnn', 'linear'"
    ):
        models.create_model("resnet", EMNIST, 62)


def test_user_builder_by_import_path():
    model = models.create_model("tffpipe.models:create_linear", EMNIST, 10)
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
        ("tffpipe.models:missing", "has no function 'missing'"),
        ("tests.models_test:returns_a_string", "returned str, not a tf.keras.Model"),
        (
            "tests.models_test:wrong_output",
            r"outputs shape \(1, 63\) for an input of shape \(1, 28, 28, 1\); the emnist task needs \(1, 62\)",
        ),
        ("tests.models_test:wrong_input", r"does not accept inputs of shape \[batch, 28, 28, 1\]"),
        ("tests.models_test:raises", r"failed when called with 62: RuntimeError: out of ideas"),
        ("tests.models_test:takes_nothing", r"failed when called with 62: TypeError: .*takes 0"),
        (
            "tests.broken_builder_module:build",
            r"importing module 'tests.broken_builder_module' .* failed: ZeroDivision",
        ),
    ],
)
def test_bad_builders_say_what_is_wrong(path, message):
    with pytest.raises(models.ModelBuilderError, match=message) as e:
        models.create_model(path, EMNIST, 62)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "path, message",
    [
        ("tests.models_test:exits", r"model builder 'tests.models_test:exits' called sys.exit\(0\) when imported or"),
        ("tests.models_test:interrupts", "raised KeyboardInterrupt when imported or called with 62"),
        ("tests.models_test:no_weights", "has no trainable weights"),
        ("tests.models_test:raises", "failed when called with 62: RuntimeError: out of ideas"),
    ],
)
def test_a_builder_that_exits_interrupts_or_has_nothing_to_train_is_a_model_error(path, message):
    with pytest.raises(models.ModelBuilderError, match=message):
        models.check_builder(path, EMNIST, 62)


def test_a_builder_that_never_returns_times_out_or_stops_when_asked():
    began = time.monotonic()
    with pytest.raises(models.ModelBuilderError, match="did not return within 0.5 s"):
        models.check_builder("tests.models_test:never_returns", EMNIST, 62, timeout_s=0.5)
    assert time.monotonic() - began < 5
    asked = time.monotonic() + 0.3  # a Ctrl-C the binary caught: the first one only asks to stop
    with pytest.raises(processes.Interrupted, match="while model builder 'tests.models_test:never_returns' was"):
        models.check_builder(
            "tests.models_test:never_returns", EMNIST, 62, timeout_s=10, stop_requested=lambda: time.monotonic() > asked
        )
    models.check_builder("linear", EMNIST, 62, timeout_s=60)  # a good builder passes
