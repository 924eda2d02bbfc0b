"""Character recognition per writer: EMNIST rows to model batches, loss, metrics, sample images."""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import configs, models
from tffpipe.data import preprocessing
from tffpipe.tasks import base
from tffpipe.tasks.emnist import files


def to_model_batch(batch) -> collections.OrderedDict:
    """A batch of EMNIST elements, or of serialized rows, to the model's input.

    x = ink in [0, 1] as [B, 28, 28, 1] (EMNIST pixels have 1.0 = background), y = the
    label as [B, 1]. Takes parsed elements (TFF's loader, `files.load_client_data`) or
    serialized tf.train.Example rows (`files.load_client_rows`), which it parses as
    one batch.
    """
    if not isinstance(batch, Mapping):
        batch = files.parse(batch)
    return collections.OrderedDict(
        x=tf.expand_dims(1.0 - batch["pixels"], -1),
        y=tf.reshape(batch["label"], [-1, 1]),
    )


def create_train_fn(config: configs.PreprocessConfig, *, seed: int):
    return preprocessing.create_train_fn(config, to_model_batch, seed=seed)


def create_eval_fn(batch_size: int = 100):
    return preprocessing.create_eval_fn(to_model_batch, batch_size)


def _loss() -> tf.keras.losses.Loss:
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _metrics() -> collections.OrderedDict:
    return collections.OrderedDict(
        loss=tf.keras.metrics.SparseCategoricalCrossentropy(from_logits=True),
        accuracy=tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
    )


def create_task_from_client_data(
    train: tff.simulation.datasets.ClientData,
    test: tff.simulation.datasets.ClientData,
    *,
    num_classes: int,
    model_name: str,
    preprocess: configs.PreprocessConfig,
    seed: int = 0,
    eval_batch_size: int = 100,
) -> base.Task:
    """The task from raw EMNIST `ClientData` (rows or parsed elements); checks the model fits."""
    train_data = train.preprocess(create_train_fn(preprocess, seed=seed))
    test_data = test.preprocess(create_eval_fn(eval_batch_size))
    model = models.create_model(model_name, configs.Task.EMNIST, num_classes)  # raises ModelBuilderError

    def sample_images(sample_seed: int, clients: int = 4, per_client: int = 6) -> dict[str, np.ndarray]:
        """A few held-out clients' images, ink dark on light as EMNIST stores them."""
        rng = np.random.default_rng([sample_seed, 0x1A6])
        ids = rng.choice(test_data.client_ids, size=min(clients, len(test_data.client_ids)), replace=False)
        images = {}
        for cid in sorted(ids):
            batch = next(iter(test_data.create_tf_dataset_for_client(cid)))
            images[cid] = 1.0 - batch["x"].numpy()[:per_client]
        return images

    return base.Task(
        kind=configs.Task.EMNIST,
        train_data=train_data,
        test_data=test_data,
        model_name=model_name,
        model_info=models.describe(model_name, model),
        num_classes=num_classes,
        loss_fn=_loss,
        metrics_fn=_metrics,
        sample_fn=sample_images,
        group_examples_fn=preprocessing.create_group_train_fn(
            preprocess, to_model_batch, seed=seed, rows_fn=train.serializable_dataset_fn
        ),
    )


def create_task(config: configs.ExperimentConfig, data: files.EmnistData, data_dir: str) -> base.Task:
    train, test = data.load(data_dir)
    return create_task_from_client_data(
        train,
        test,
        num_classes=data.num_classes,
        model_name=config.model,
        preprocess=config.preprocess,
        seed=config.seed,
    )
