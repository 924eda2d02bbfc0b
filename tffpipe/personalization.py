"""How much each user gains when the global model is fine-tuned on their own data (no TFF).

Wang et al. 2019 ("Federated Evaluation of On-Device Personalization", measured on a
production keyboard) evaluate personalization per device: fine-tune the global model
on the device's first examples, then evaluate on its later ones, and report the
distribution over devices of accuracy before and after. This does that in simulation
on held-out clients: each client's held-out examples, in their stored order, are split
into a first part (fine-tuning, `epochs` passes of client SGD at the run's client
learning rate and batch size, as in training) and the rest (evaluation, the task's own
accuracy metric, so the keyboard's masking applies). Before and after are measured on
the same rest, from the same global weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tffpipe import configs, errors


@dataclasses.dataclass(frozen=True)
class ClientResult:
    client_id: str
    fine_tune_examples: int
    eval_counted: int  # what the metric counted on the rest: examples, or unmasked tokens
    before: float
    after: float


@dataclasses.dataclass(frozen=True)
class Summary:
    """The per-client distribution of accuracy before and after fine-tuning."""

    metric: str
    clients: int
    skipped: int  # clients whose split left either part empty, or nothing the metric counts
    before_p10: float
    before_p50: float
    before_p90: float
    after_p10: float
    after_p50: float
    after_p90: float
    mean_gain: float
    fraction_improved: float  # clients whose accuracy after is higher than before
    fraction_hurt: float  # clients whose accuracy after is lower than before

    def metrics(self, prefix: str = "personalization") -> dict[str, float]:
        """Stable nested names for metrics.csv and TensorBoard."""
        names = ("before_p10", "before_p50", "before_p90", "after_p10", "after_p50", "after_p90", "mean_gain")
        names += ("fraction_improved", "fraction_hurt")  # per metric: top-3 can improve where top-1 does not
        values = {f"{prefix}/{self.metric}_{n}": float(getattr(self, n)) for n in names}
        values[f"{prefix}/clients"] = float(self.clients)
        return values

    def lines(self) -> list[str]:
        return [
            f"personalization ({self.metric}): {self.clients:,} clients ({self.skipped:,} skipped: too few examples)",
            f"before  p10/50/90   {self.before_p10:.4f} / {self.before_p50:.4f} / {self.before_p90:.4f}",
            f"after   p10/50/90   {self.after_p10:.4f} / {self.after_p50:.4f} / {self.after_p90:.4f}",
            f"mean gain {self.mean_gain:+.4f}; improved {self.fraction_improved:.1%}, hurt {self.fraction_hurt:.1%}",
        ]


def split_point(examples: int, fraction: float) -> int:
    """Examples used for fine-tuning: the first floor(fraction * n) (the rest is evaluated)."""
    return int(np.floor(fraction * examples))


def _client_examples(client_data, client_id: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch in client_data.create_tf_dataset_for_client(client_id):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, Mapping) else batch
        xs.append(x.numpy())
        ys.append(y.numpy())
    if not xs:
        return np.zeros((0,)), np.zeros((0,))
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(
    model: tf.keras.Model,
    client_data,
    client_ids: Sequence[str],
    *,
    loss_fn: Callable[[], tf.keras.losses.Loss],
    metrics_fn: Callable[[], Mapping[str, tf.keras.metrics.Metric]],
    metrics: Sequence[str] = ("accuracy",),
    epochs: int = 1,
    fraction: float = 0.5,
    learning_rate: float,
    batch_size: int,
) -> dict[str, tuple[Summary, list[ClientResult]]]:
    """Fine-tunes `model`'s weights on each client's first examples and evaluates on the rest.

    Args:
      model: the global model; its weights are restored after each client (and at the end).
      client_data: held-out clients' batches ({x, y} or (x, y)), in their stored order.
      loss_fn, metrics_fn: the task's (`base.Task`), so fine-tuning minimizes the training
        loss and the metrics mask what the task's mask.
      metrics: which of `metrics_fn()` to report, each from the same fine-tuning; a client
        is kept where the first counts something on its rest.
      epochs, learning_rate, batch_size: the client's local training (plain SGD, as the
        client optimizer in `algorithms`).
      fraction: share of each client's examples used for fine-tuning, in (0, 1).

    Returns:
      {metric: (its summary, each client's result)}.

    Raises:
      errors.InputError: no client has examples on both sides of the split.
    """
    global_weights = model.get_weights()
    # Plain SGD keeps no state but its step count, which does not change its steps: one optimizer serves all.
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate), loss=loss_fn())
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def score(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[float, float]]:
        fresh = metrics_fn()
        for i in range(0, len(x), 100):
            logits = predict(x[i : i + 100])
            for name in metrics:
                fresh[name].update_state(y[i : i + 100], logits)
        return {name: (float(fresh[name].result().numpy()), float(fresh[name].count.numpy())) for name in metrics}

    results: dict[str, list[ClientResult]] = {name: [] for name in metrics}
    skipped = 0
    try:
        for cid in client_ids:
            x, y = _client_examples(client_data, cid)
            k = split_point(len(x), fraction)
            if k == 0 or k == len(x):
                skipped += 1
                continue
            before = score(x[k:], y[k:])
            if before[metrics[0]][1] == 0:
                skipped += 1
                continue
            model.fit(x[:k], y[:k], batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
            after = score(x[k:], y[k:])
            model.set_weights(global_weights)
            for name in metrics:
                results[name].append(ClientResult(cid, k, int(before[name][1]), before[name][0], after[name][0]))
    finally:
        model.set_weights(global_weights)
    if not results[metrics[0]]:
        raise errors.InputError(
            f"personalization with fraction={fraction:g} leaves none of the {len(client_ids)} clients examples on "
            "both sides (fine-tuning and evaluation); choose a fraction that splits their examples"
        )
    return {name: (summarize(results[name], name, skipped), results[name]) for name in metrics}


def evaluate_task(
    model: tf.keras.Model,
    task,
    client_ids: Sequence[str],
    settings: configs.PersonalizationConfig,
    *,
    client_learning_rate: float,
    batch_size: int,
) -> dict[str, tuple[Summary, list[ClientResult]]]:
    """`evaluate` on a task's held-out clients with its loss and accuracy metrics: what the personalize
    binary and training (`program`, every `--personalize_every` rounds) both run.

    Args:
      task: a `base.Task`; its `test_data`, `loss_fn` and `metrics_fn` (accuracy, and top-3 where it has it).
      client_ids: held-out clients, cut to `settings.max_clients` (in the order given) when that is positive.
      settings: epochs, split and rate (None: `client_learning_rate`, the run's).
      batch_size: the run's, as clients train.
    """
    ids = list(client_ids)
    if settings.max_clients > 0:
        ids = ids[: settings.max_clients]
    return evaluate(
        model,
        task.test_data,
        ids,
        loss_fn=task.loss_fn,
        metrics_fn=task.metrics_fn,
        metrics=[m for m in ("accuracy", "top3_accuracy") if m in task.metrics_fn()],
        epochs=settings.epochs,
        fraction=settings.fraction,
        learning_rate=settings.learning_rate or client_learning_rate,
        batch_size=batch_size,
    )


def release_values(outcomes: Mapping[str, tuple[Summary, Sequence[ClientResult]]]) -> dict[str, float | np.ndarray]:
    """The summaries' scalars and each client's before, after and gain as arrays (TensorBoard histograms)."""
    values: dict[str, float | np.ndarray] = {}
    for name, (summary, clients) in outcomes.items():
        values.update(summary.metrics())
        before = np.array([c.before for c in clients])
        after = np.array([c.after for c in clients])
        values[f"personalization/{name}_before"] = before
        values[f"personalization/{name}_after"] = after
        values[f"personalization/{name}_gain"] = after - before
    return values


def write_tensorboard(logdir: str, outcomes: Mapping[str, tuple[Summary, Sequence[ClientResult]]]) -> None:
    """`release_values` at step 0: scalars, and histograms for the arrays."""
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for tag, value in release_values(outcomes).items():
            if np.ndim(value):
                tf.summary.histogram(tag, value, step=0)
            else:
                tf.summary.scalar(tag, value, step=0)
    writer.close()


def summarize(results: Sequence[ClientResult], metric: str = "accuracy", skipped: int = 0) -> Summary:
    before = np.array([r.before for r in results])
    after = np.array([r.after for r in results])
    return Summary(
        metric=metric,
        clients=len(results),
        skipped=skipped,
        before_p10=float(np.percentile(before, 10)),
        before_p50=float(np.percentile(before, 50)),
        before_p90=float(np.percentile(before, 90)),
        after_p10=float(np.percentile(after, 10)),
        after_p50=float(np.percentile(after, 50)),
        after_p90=float(np.percentile(after, 90)),
        mean_gain=float(np.mean(after - before)),
        fraction_improved=float(np.mean(after > before)),
        fraction_hurt=float(np.mean(after < before)),
    )
