"""Per-client evaluation of a Keras model: the accuracy distribution over held-out writers.

Federated evaluation reports one pooled number; for devices the spread matters (how
badly the model serves its worst users), so this reports per-client accuracies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Distribution:
    clients: int
    examples: int
    pooled_accuracy: float  # all examples together, as federated evaluation reports
    mean: float  # mean over clients, each client counted once
    p10: float
    median: float
    p90: float
    worst_decile_mean: float

    def lines(self) -> list[str]:
        return [
            f"clients {self.clients:,}, examples {self.examples:,}",
            f"pooled accuracy        {self.pooled_accuracy:.4f}",
            f"per-client mean        {self.mean:.4f}",
            f"per-client p10/50/90   {self.p10:.4f} / {self.median:.4f} / {self.p90:.4f}",
            f"worst decile (mean)    {self.worst_decile_mean:.4f}",
        ]


def load_keras_model(path: str) -> tf.keras.Model:
    """A saved Keras model, or a ValueError saying why the file is not one."""
    try:
        return tf.keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001  (Keras raises many types on a file that is not a model)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a loadable Keras model ({type(e).__name__}: {first})") from e


def per_client_accuracy(model: tf.keras.Model, client_data, client_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, examples) per client; `client_data` yields batches of {x, y}."""
    predict = tf.function(
        lambda x: tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32),
        input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)],  # one trace for every batch size
    )
    accuracies, counts = [], []
    for cid in client_ids:
        correct = total = 0
        for batch in client_data.create_tf_dataset_for_client(cid):
            correct += int(tf.reduce_sum(tf.cast(predict(batch["x"]) == batch["y"][:, 0], tf.int32)))
            total += int(tf.shape(batch["y"])[0])
        if total:
            accuracies.append(correct / total)
            counts.append(total)
    return np.array(accuracies), np.array(counts)


def summarize(accuracies: np.ndarray, counts: np.ndarray) -> Distribution:
    if len(accuracies) == 0:
        raise ValueError("no client had any test example")
    ordered = np.sort(accuracies)
    worst = ordered[: max(1, len(ordered) // 10)]
    return Distribution(
        clients=len(accuracies),
        examples=int(counts.sum()),
        pooled_accuracy=float((accuracies * counts).sum() / counts.sum()),
        mean=float(accuracies.mean()),
        p10=float(np.percentile(accuracies, 10)),
        median=float(np.median(accuracies)),
        p90=float(np.percentile(accuracies, 90)),
        worst_decile_mean=float(worst.mean()),
    )
