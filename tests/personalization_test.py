"""Personalization: fine-tuning helps clients the global model serves badly, and cannot hurt much otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tffpipe import errors, personalization


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 classes around fixed centers in 8 dimensions, y as [n, 1]."""
    centers = np.random.default_rng(0).normal(0.0, 3.0, (4, 8))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    return (centers[y] + rng.normal(0.0, 1.0, (n, 8))).astype(np.float32), y.reshape(-1, 1)


class _Clients:
    """A stand-in ClientData: {x, y} batches of 10 per client, in a fixed order."""

    def __init__(self, data: dict[str, tuple[np.ndarray, np.ndarray]]):
        self._data = data
        self.client_ids = sorted(data)

    def create_tf_dataset_for_client(self, cid: str) -> tf.data.Dataset:
        x, y = self._data[cid]
        return tf.data.Dataset.from_tensor_slices({"x": x, "y": y}).batch(10)


def _global_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, activation="relu")])
    model.add(tf.keras.layers.Dense(4))
    model.compile(tf.keras.optimizers.Adam(0.02), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*_toy(400, seed=1), epochs=10, batch_size=32, verbose=0)
    return model


def _run(model, clients, **kwargs):
    (outcome,) = personalization.evaluate(
        model,
        clients,
        clients.client_ids,
        loss_fn=lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics_fn=lambda: {"accuracy": tf.keras.metrics.SparseCategoricalAccuracy()},
        batch_size=10,
        **kwargs,
    ).values()
    return outcome


def test_fine_tuning_helps_clients_whose_labels_are_permuted():
    model = _global_model()
    weights = [w.copy() for w in model.get_weights()]
    # Client i writes class c as (c + 1 + i % 3) % 4: the global model is wrong on (nearly) all of it.
    data = {}
    for i in range(6):
        x, y = _toy(60, seed=10 + i)
        data[f"c{i}"] = (x, (y + 1 + i % 3) % 4)
    summary, results = _run(model, _Clients(data), epochs=5, fraction=0.5, learning_rate=0.1)
    assert [r.fine_tune_examples for r in results] == [30] * 6  # the first half of 60
    assert [r.eval_counted for r in results] == [30] * 6
    assert summary.before_p90 < 0.1  # a permutation without fixed points: the global model scores ~0
    assert summary.mean_gain > 0.5 and summary.fraction_improved == 1.0
    for w, saved in zip(model.get_weights(), weights, strict=True):  # the global model is left as it was
        np.testing.assert_array_equal(w, saved)


def test_fine_tuning_cannot_hurt_clients_the_global_model_already_serves_much():
    model = _global_model()
    data = {f"c{i}": _toy(40, seed=20 + i) for i in range(6)}  # the global labeling
    summary, _ = _run(model, _Clients(data), epochs=1, fraction=0.5, learning_rate=0.01)
    assert summary.before_p50 > 0.95
    # 2 SGD steps of 0.01 on examples the model already fits: each of 20 predictions per
    # client could flip only at the decision boundary; measured 0 change.
    assert summary.mean_gain >= -0.02 and summary.fraction_hurt <= 1 / 6


def test_a_split_that_leaves_no_client_both_parts_is_refused():
    model = _global_model()
    data = {"one": _toy(1, seed=5), "two": _toy(2, seed=6)}
    # fraction 0.5: 1 example -> 0 to fine-tune; fraction 0.99: 2 examples -> 1 and 1, so "two" is kept.
    summary, _ = _run(model, _Clients(data), fraction=0.99, learning_rate=0.01)
    assert (summary.clients, summary.skipped) == (1, 1)
    with pytest.raises(errors.InputError, match="fraction=0.3 leaves none of the 2 clients"):
        _run(model, _Clients(data), fraction=0.3, learning_rate=0.01)


def test_the_summary_is_the_distribution_over_clients():
    results = [
        personalization.ClientResult("a", 5, 10, before=0.2, after=0.4),
        personalization.ClientResult("b", 5, 10, before=0.5, after=0.5),
        personalization.ClientResult("c", 5, 10, before=0.8, after=0.6),
    ]
    s = personalization.summarize(results)
    # numpy's linear percentiles of 3 values: p10 sits 0.2 of the way from the first to the second,
    # so before (0.2, 0.5, 0.8): p10 = 0.2 + 0.2 * 0.3 = 0.26; after (0.4, 0.5, 0.6): 0.4 + 0.2 * 0.1 = 0.42.
    assert (s.before_p10, s.before_p50, s.before_p90) == pytest.approx((0.26, 0.5, 0.74))
    assert (s.after_p10, s.after_p50, s.after_p90) == pytest.approx((0.42, 0.5, 0.58))
    assert s.mean_gain == pytest.approx(0.0) and s.fraction_improved == s.fraction_hurt == pytest.approx(1 / 3)
    assert s.metrics()["personalization/accuracy_after_p50"] == pytest.approx(0.5)


def test_the_binary_refuses_a_split_without_both_parts_and_a_missing_model_in_one_line(forks, tmp_path):
    import os

    cases = [
        (["--personalize_fraction=1"], "--personalize_fraction=1.0: fraction must be in (0, 1), got 1.0"),
        (["--fraction=0.3"], "--fraction is now --personalize_fraction, the name train uses: pass --personalize_fra"),
        (["--personalize_epochs=0"], "--personalize_epochs=0: epochs must be >= 1"),
        ([], "no Keras model file at"),
    ]
    base = [f"--root_dir={tmp_path}/runs", f"--cache_dir={tmp_path}/c"]
    procs = forks.run([("personalize", base + a) for a, _ in cases])  # forked from one process that imported TF
    for proc, (_, expected) in zip(procs, cases, strict=True):
        err = proc.stderr
        assert proc.returncode == 2 and err.count("\n") == 1 and expected in err, err
    assert os.listdir(tmp_path) == []


def test_release_values_name_each_metrics_distribution_and_keep_each_clients_gain():
    results = [
        personalization.ClientResult("a", 5, 10, before=0.2, after=0.4),
        personalization.ClientResult("b", 5, 10, before=0.5, after=0.5),
    ]
    values = personalization.release_values(
        {"top3_accuracy": (personalization.summarize(results, "top3_accuracy"), results)}
    )
    # One of two improved (0.2 -> 0.4), none hurt; the gains are 0.4 - 0.2 and 0.5 - 0.5.
    assert values["personalization/top3_accuracy_fraction_improved"] == 0.5
    assert values["personalization/top3_accuracy_fraction_hurt"] == 0.0
    assert values["personalization/clients"] == 2.0
    np.testing.assert_allclose(values["personalization/top3_accuracy_gain"], [0.2, 0.0])


def test_in_training_personalization_runs_with_the_evaluation_or_is_refused():
    from tffpipe import configs, validation

    config = configs.ExperimentConfig(eval_clients=4, loop=configs.LoopConfig(eval_every=2))
    configs.PersonalizationConfig(every=4).check_in_training(config)  # every second evaluation
    with pytest.raises(validation.ConfigError, match="every=3 must be a multiple of eval_every=2"):
        configs.PersonalizationConfig(every=3).check_in_training(config)
    no_eval = configs.ExperimentConfig(eval_clients=0)
    with pytest.raises(validation.ConfigError, match="eval_clients=0 evaluates none"):
        configs.PersonalizationConfig(every=10).check_in_training(no_eval)
    configs.PersonalizationConfig(every=0).check_in_training(no_eval)  # off: nothing to check
    with pytest.raises(validation.ConfigError, match="every must be >= 0"):
        configs.PersonalizationConfig(every=-1)
