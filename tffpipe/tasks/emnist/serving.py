"""What the phone runs for character recognition: EMNIST pixels in, one character's logits out."""

from __future__ import annotations

import numpy as np

from tffpipe import configs, export, models


def _ink(pixels):
    """EMNIST pixels [1, 28, 28] (1.0 = background) -> the model's ink [1, 28, 28, 1], as `task.to_model_batch`."""
    import tensorflow as tf

    return tf.expand_dims(1.0 - pixels, -1)


def _pixels(x: np.ndarray) -> np.ndarray:
    return 1.0 - x[..., 0]


def create_serving_spec(config: configs.ExperimentConfig, data_dir: str) -> export.ServingSpec:
    """The serving signature takes a canvas as EMNIST stores it, so the app does no preprocessing."""
    del config, data_dir  # the same for every EMNIST configuration
    return export.ServingSpec(
        input_shape=models.INPUT_SHAPE[:2],
        input_dtype="float32",
        input_name="pixels",
        preprocess=_ink,
        to_serving_input=_pixels,
    )
