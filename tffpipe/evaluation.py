"""Per-client evaluation of a Keras model: the distribution of a task's metrics over held-out clients.

Federated evaluation reports one pooled number; for devices the spread matters (how
badly the model serves its worst users), so this reports each client's value of the
task's own accuracy metrics (EMNIST's accuracy; the keyboard's accuracy and top-3
accuracy over real words), and their distribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from tffpipe import errors


@dataclasses.dataclass(frozen=True)
class Distribution:
    name: str
    clients: int
    examples: int  # what the metric counts: examples, or unmasked tokens
    pooled_accuracy: float  # all examples together, as federated evaluation reports
    mean: float  # mean over clients, each client counted once
    p10: float
    median: float
    p90: float
    worst_decile_mean: float

    def lines(self) -> list[str]:
        return [
            f"{self.name}: clients {self.clients:,}, counted {self.examples:,}",
            f"pooled accuracy        {self.pooled_accuracy:.4f}",
            f"per-client mean        {self.mean:.4f}",
            f"per-client p10/50/90   {self.p10:.4f} / {self.median:.4f} / {self.p90:.4f}",
            f"worst decile (mean)    {self.worst_decile_mean:.4f}",
        ]


def load_keras_model(path: str) -> tf.keras.Model:
    """A saved Keras model, or an `errors.InputError` saying why the file is not one."""
    try:
        return tf.keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001  (Keras raises many types on a file that is not a model)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise errors.InputError(f"{path} is not a loadable Keras model ({type(e).__name__}: {first})") from e


def per_client_metrics(
    model: tf.keras.Model, task, client_ids: Sequence[str], names: Sequence[str] = ("accuracy", "top3_accuracy")
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (value per client, count per client)} for the task's metrics among `names`.

    Each client gets fresh copies of the task's Keras metrics (`task.metrics_fn`), so
    masking (padding, out-of-vocabulary words) is exactly the training metrics'. Clients
    whose metric counted nothing are left out.
    """
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    wanted = [n for n in names if n in task.metrics_fn()]
    values: dict[str, list] = {n: [] for n in wanted}
    counts: dict[str, list] = {n: [] for n in wanted}
    for cid in client_ids:
        metrics = task.metrics_fn()
        for batch in task.test_data.create_tf_dataset_for_client(cid):
            x, y = (batch["x"], batch["y"]) if isinstance(batch, Mapping) else batch
            logits = predict(x)
            for n in wanted:
                metrics[n].update_state(y, logits)
        for n in wanted:
            count = float(metrics[n].count.numpy())
            if count > 0:
                values[n].append(float(metrics[n].result().numpy()))
                counts[n].append(count)
    return {n: (np.array(values[n]), np.array(counts[n])) for n in wanted}


def summarize(accuracies: np.ndarray, counts: np.ndarray, name: str = "accuracy") -> Distribution:
    if len(accuracies) == 0:
        raise errors.InputError("no client had any test example")
    ordered = np.sort(accuracies)
    worst = ordered[: max(1, len(ordered) // 10)]
    return Distribution(
        name=name,
        clients=len(accuracies),
        examples=int(counts.sum()),
        pooled_accuracy=float((accuracies * counts).sum() / counts.sum()),
        mean=float(accuracies.mean()),
        p10=float(np.percentile(accuracies, 10)),
        median=float(np.median(accuracies)),
        p90=float(np.percentile(accuracies, 90)),
        worst_decile_mean=float(worst.mean()),
    )


COUNTS = ("num_examples", "num_batches", "num_tokens")  # what evaluation counts, not a quality of the model


def client_quantiles(per_client: Mapping[str, np.ndarray], prefix: str = "eval") -> dict[str, float | np.ndarray]:
    """The per-client distribution of a federated evaluation's metrics, by stable nested names.

    For each metric but the counts: `<prefix>/<metric>_p10`, `_p50`, `_p90` (numpy's
    linear percentiles over clients, each client counted once) and the values
    themselves as `<prefix>/per_client/<metric>` (an array: a TensorBoard histogram,
    never a CSV column); and `<prefix>/clients`, how many clients they are over.
    Clients that had no example (`num_examples` 0) are left out: their metrics are 0
    by convention, not a measurement.

    Args:
      per_client: {metric: value of each client}, as `algorithms.build_evaluation_process(per_client=True)`
        and grouped evaluation (`group_evaluation`) return them (any order; quantiles do not depend on it).
    """
    keep = np.asarray(per_client.get("num_examples", np.ones_like(next(iter(per_client.values())))), float) > 0
    values: dict[str, float | np.ndarray] = {f"{prefix}/clients": float(keep.sum())}
    if not keep.any():
        return values
    for name, each in per_client.items():
        if name in COUNTS:
            continue
        each = np.asarray(each, np.float64)[keep]
        for q in (10, 50, 90):
            values[f"{prefix}/{name}_p{q}"] = float(np.percentile(each, q))
        values[f"{prefix}/per_client/{name}"] = np.sort(each)  # sorted: the same histogram whatever the order
    return values
