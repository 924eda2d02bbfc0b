import collections
import dataclasses
import os
import re
from collections.abc import Mapping

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy

from tests import conftest
from tffpipe import accounting, aggregation, algorithms, audit, client_groups, configs, validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FEDAVG, FEDADAM, FEDYOGI = configs.Algorithm.FEDAVG, configs.Algorithm.FEDADAM, configs.Algorithm.FEDYOGI
FEDPROX, FEDSGD = configs.Algorithm.FEDPROX, configs.Algorithm.FEDSGD
# FedProx's mu, strong enough to matter: at lr 0.1 its pull mu (w - w0) is a tenth of a step's gradient.
MU = 1.0
NONE, FIXED = configs.Mechanism.NONE, configs.Mechanism.FIXED
ADAPTIVE, TREE = configs.Mechanism.ADAPTIVE, configs.Mechanism.TREE
# Tests that count zeroed or clipped members seed Keras' initializers with SEED. Then the first
# round's updates of the first five clients (linear, batch 8, lr 0.1) have largest |coordinate|
# 0.063, 0.076, 0.033, 0.059, 0.033 and L2 norms 1.05, 1.24, 0.65, 1.01, 0.73: an L-inf bound of
# 0.07 zeroes one of them, and CLIP = 0.8 then clips two of the other four (1.05 and 1.01).
SEED, ZEROING = 0, 0.07

# z small enough that the (identical, seeded) noise does not drown a wrong clipped sum
# (noise std zC/m = 0.0016 per coordinate of the mean); a clip that binds for some members
# only (first round, batch 8, lr 0.1: update norms 0.66-1.21 linear, 0.51-0.96 mlp).
NOISE, CLIP = 0.01, 0.8
IDS = 5  # real clients per round: groups of 2, 2, 1 at K = 2


BATCH = 8


def _task(data_dir, model, epochs=1):
    return conftest.emnist_task(data_dir, model, batch_size=BATCH, epochs=epochs)


def _processes(task, algorithm, mechanism, group_size, batched=None, noise=None, **dp):
    """(per-client process, grouped process) of the same algorithm, mechanism and noise seed.

    `batched`: None, members one after the other; "vmap", members together through
    `tf.vectorized_map` of the model; "dense", through `create_dense_forward`; "shared",
    on the shared weights (`train_members_shared`) with the task's group read.
    `noise`: z (default NOISE with fixed clipping, else 0); `dp`: more `DpConfig` values.
    """
    config = algorithms.AlgorithmConfig(algorithm=algorithm, proximal_strength=MU)
    dp = configs.DpConfig(mechanism=mechanism, clip=CLIP, **dp)
    noise = (NOISE if mechanism is FIXED else 0.0) if noise is None else noise
    plan = conftest.plan(mechanism, noise, IDS)
    per_client = task.compose_train(
        algorithms.build_training_process(
            task.learning_model(), config, aggregator=aggregation.build_factory(dp, plan, noise_seed=11)
        )
    )
    grouped_factory = client_groups.build_factory(dp, plan, noise_seed=11)
    # Per client a Keras-wrapped model's FedAvg client work keeps the optimizer's hyperparameters.
    keras_wrapped = not isinstance(task.learning_model(), tff.learning.models.FunctionalModel)
    grouped = client_groups.build_training_process(
        client_groups.create_functional_model(task),
        config,
        task.train_data.serializable_dataset_fn,
        group_size,
        aggregator=grouped_factory,
        clip=CLIP if mechanism is FIXED and not dp.zeroing_norm else None,
        batch_size=BATCH if batched else None,
        forward=client_groups.create_dense_forward(task.create_keras_model()) if batched == "dense" else None,
        activations=client_groups.dense_activations(task.create_keras_model()) if batched == "shared" else None,
        group_examples_fn=task.group_examples_fn if batched == "shared" else None,
        hparams_state=keras_wrapped and algorithm not in (FEDPROX, FEDSGD),
    )
    return per_client, grouped


def _assert_weights_close(process_a, state_a, process_b, state_b, rtol=1e-5):
    """Every weight tensor of b within rtol * (a's largest entry) of a's."""
    for a, b in zip(
        process_a.get_model_weights(state_a).trainable, process_b.get_model_weights(state_b).trainable, strict=True
    ):
        assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(a)), np.max(np.abs(a - b))


def _run(process, rounds, ids, state):
    """`rounds` rounds on `ids` from `state` (each builder draws its own initial weights)."""
    outputs = []
    for _ in range(rounds):
        output = process.next(state, ids)
        outputs.append(output)
        state = output.state
    return outputs


def test_pack_makes_even_groups_in_sampled_order():
    ids = ["e", "a", "d", "b", "c"]
    # 5 ids, K = 2: ceil(5/2) = 3 groups of 2, 2, 1, in the order sampled.
    assert client_groups.pack(ids, 2) == [["e", "a"], ["d", "b"], ["c"]]
    # 7 ids, K = 3: 3 groups of 3, 2, 2 (not 3, 3, 1), so workers get similar work.
    assert [len(g) for g in client_groups.pack(list("abcdefg"), 3)] == [3, 2, 2]
    assert client_groups.pack(ids, 10) == [ids]
    assert client_groups.pack([], 4) == []  # Poisson sampling may pick nobody
    with pytest.raises(ValueError, match="group_size must be positive, got 0"):
        client_groups.pack(ids, 0)


@pytest.mark.parametrize(
    "algorithm, mechanism, model, batched, epochs",
    [
        (FEDAVG, NONE, "mlp", None, 1),  # members one after the other (TFF's client update)
        (FEDAVG, FIXED, "linear", None, 1),
        (FEDADAM, NONE, "linear", "vmap", 1),  # members step together
        (FEDYOGI, FIXED, "mlp", "dense", 1),
        (FEDAVG, NONE, "mlp", "dense", 2),  # two epochs: batches run across the epoch boundary
        (FEDAVG, NONE, "mlp", "shared", 2),  # on the shared weights, read once per group
        (FEDADAM, FIXED, "linear", "shared", 1),
        (FEDAVG, FIXED, "small_cnn", None, 1),  # Keras-wrapped per client, converted in groups
        (FEDSGD, NONE, "small_cnn", None, 1),  # the gradient at the initial weights
        (FEDPROX, FIXED, "linear", None, 1),  # the proximal term in every step
    ],
    ids=[
        "loop-fedavg-none-mlp",
        "loop-fedavg-fixed-linear",
        "vmap-fedadam-none-linear",
        "dense-fedyogi-fixed-mlp",
        "dense-fedavg-none-mlp-2epochs",
        "shared-fedavg-none-mlp-2epochs",
        "shared-fedadam-fixed-linear",
        "loop-fedavg-fixed-small_cnn",
        "loop-fedsgd-none-small_cnn",
        "loop-fedprox-fixed-linear",
    ],
)
def test_grouped_rounds_give_the_per_client_weights_and_metrics(
    tiny_data_dir, tff_context, algorithm, mechanism, model, batched, epochs
):
    task = _task(tiny_data_dir, model, epochs)
    per_client, grouped = _processes(task, algorithm, mechanism, group_size=2, batched=batched)
    ids = task.train_data.client_ids[:IDS]
    # The grouped process takes the per-client state as it is: the checkpoints are interchangeable.
    state = per_client.initialize()
    # small_cnn: one round. Round 2 starts from weights ~1e-7 apart (the group's sums add in
    # another order), and small_cnn's initial weights are drawn unseeded: once in five runs
    # round 2 differed by 2.6e-5 relative (likely a ReLU within rounding of 0 flipping).
    rounds = 1 if model == "small_cnn" else 2
    expected, actual = _run(per_client, rounds, ids, state), _run(grouped, rounds, ids, state)
    for e, a in zip(expected, actual, strict=True):
        _assert_weights_close(per_client, e.state, grouped, a.state)
        train_e, train_a = e.metrics["client_work"]["train"], a.metrics["client_work"]["train"]
        assert list(train_a) == list(train_e)
        np.testing.assert_allclose(list(train_a.values()), list(train_e.values()), rtol=1e-5)
        assert a.metrics["client_work"]["groups"]["clients"] == IDS
    if mechanism is FIXED:
        query_e = expected[-1].metrics["aggregator"]["dp_query_metrics"]
        query_a = actual[-1].metrics["aggregator"]["dp_query_metrics"]
        assert query_a["clip"] == query_e["clip"] == pytest.approx(CLIP)
        # The per-client query counts the clipped updates; the group client work counts its members'.
        assert actual[-1].metrics["client_work"]["groups"]["clipped_count"] == query_e["clipped_count"]
        # TFF draws a Keras-wrapped model's initial weights unseeded, so small_cnn's norms vary
        # from run to run; the calibrated models pin that the clip binds for some members only.
        if model in ("linear", "mlp"):
            assert 0 < query_e["clipped_count"] < IDS


@pytest.mark.parametrize(
    "mechanism, noise, zeroing_norm",
    [(NONE, None, 0.0), (FIXED, None, 0.0), (ADAPTIVE, 0.0, 0.0), (TREE, NOISE, ZEROING)],
    ids=["none", "fixed", "adaptive", "tree-zeroing"],
)
def test_a_group_of_one_is_the_per_client_path(tiny_data_dir, tff_context, mechanism, noise, zeroing_norm):
    task = _task(tiny_data_dir, "linear")
    per_client, grouped = _processes(task, FEDAVG, mechanism, group_size=1, noise=noise, zeroing_norm=zeroing_norm)
    ids = task.train_data.client_ids[:3]
    state = per_client.initialize()
    (expected,), (actual,) = _run(per_client, 1, ids, state), _run(grouped, 1, ids, state)
    # With DP each member's update is preprocessed as it is per client: the same sum of the same terms.
    _assert_weights_close(per_client, expected.state, grouped, actual.state, rtol=0 if mechanism is not NONE else 1e-6)
    assert actual.metrics["client_work"]["train"] == expected.metrics["client_work"]["train"]
    if mechanism is not NONE:  # clip, noise, clipped and zeroed counts: the same values (in any key order)
        assert _plain(actual.metrics["aggregator"]) == _plain(expected.metrics["aggregator"])


def _plain(value):
    """Nested mappings as plain dicts, whose equality ignores key order."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


@pytest.mark.parametrize(
    "mechanism, batched", [(NONE, None), (NONE, "dense"), (FIXED, "vmap"), (TREE, "dense"), (FIXED, "shared")]
)
def test_a_real_client_without_examples_changes_nothing(tiny_data_dir, tff_context, mechanism, batched):
    task = _task(tiny_data_dir, "linear")
    _, grouped = _processes(task, FEDAVG, mechanism, group_size=3, batched=batched)
    ids = task.train_data.client_ids[:4]
    # "nobody" has no rows: an empty dataset, weight 0 and a zero update. It shares a group with two real clients.
    state = grouped.initialize()
    (without,), (with_empty,) = _run(grouped, 1, ids, state), _run(grouped, 1, [*ids[:2], "nobody", *ids[2:]], state)
    _assert_weights_close(grouped, without.state, grouped, with_empty.state, rtol=1e-6)
    assert with_empty.metrics["client_work"]["train"] == without.metrics["client_work"]["train"]
    assert with_empty.metrics["client_work"]["groups"]["clients"] == 5


def test_an_empty_member_is_a_zero_update_as_per_client_with_adaptive_clipping(tiny_data_dir, tff_context):
    task = _task(tiny_data_dir, "linear")
    per_client, grouped = _processes(task, FEDAVG, ADAPTIVE, group_size=3, noise=0.0, zeroing_norm=ZEROING)
    plan = conftest.plan(ADAPTIVE, 0.0, IDS)
    ids = task.train_data.client_ids[:4]
    with_empty = [*ids[:2], "nobody", *ids[2:]]  # groups [a, b, nobody] and [c, d, padding]
    state = per_client.initialize()
    (without,) = _run(grouped, 1, ids, state)
    (expected,), (actual,) = _run(per_client, 1, with_empty, state), _run(grouped, 1, with_empty, state)
    # "nobody" trains on no examples: a zero update, which adds nothing to the clipped sum (the mean
    # divides by the planned m, not by who came), so the weights are those without it...
    _assert_weights_close(grouped, without.state, grouped, actual.state, rtol=1e-6)
    assert actual.metrics["client_work"]["train"] == without.metrics["client_work"]["train"]
    # ...but, per client as in a group, it is one more update under the clip in the quantile count.
    _assert_weights_close(per_client, expected.state, grouped, actual.state)
    clip = {
        name: aggregation.round_metrics(plan, output.metrics["aggregator"], 5)["privacy/clip"]
        for name, output in (("per_client", expected), ("grouped", actual), ("without", without))
    }
    assert clip["grouped"] == pytest.approx(clip["per_client"], rel=1e-6) and clip["grouped"] != clip["without"]
    assert actual.metrics["aggregator"]["zeroed_count"] == expected.metrics["aggregator"]["zeroed_count"]


@pytest.mark.parametrize(
    "mechanism, noise, zeroing_norm, model, batched",
    [
        (ADAPTIVE, 0.0, 0.0, "linear", None),  # TF Privacy's adaptive noise is unseeded: off
        (TREE, NOISE, 0.0, "mlp", None),  # the tree's seeded noise: the same noise on both paths
        (FIXED, NOISE, ZEROING, "linear", None),
        (ADAPTIVE, 0.0, ZEROING, "linear", "dense"),
        (TREE, NOISE, ZEROING, "mlp", "shared"),  # each member's own update, from the shared weights
    ],
    ids=["adaptive", "tree-noised", "fixed-zeroing-noised", "adaptive-zeroing-dense", "tree-zeroing-shared"],
)
def test_member_mechanisms_give_the_per_client_weights_metrics_and_events(
    tiny_data_dir, tff_context, mechanism, noise, zeroing_norm, model, batched
):
    tf.keras.utils.set_random_seed(SEED)  # the initial weights the counts below are computed for
    task = _task(tiny_data_dir, model)
    per_client, grouped = _processes(
        task, FEDAVG, mechanism, group_size=2, batched=batched, noise=noise, zeroing_norm=zeroing_norm
    )
    plan = conftest.plan(mechanism, noise, IDS)
    ids = task.train_data.client_ids[:IDS]  # groups of 2, 2 and 1: the last one has a padding member
    state = per_client.initialize()
    expected, actual = _run(per_client, 2, ids, state), _run(grouped, 2, ids, state)
    for e, a in zip(expected, actual, strict=True):
        _assert_weights_close(per_client, e.state, grouped, a.state)
        train_e, train_a = e.metrics["client_work"]["train"], a.metrics["client_work"]["train"]
        np.testing.assert_allclose(list(train_a.values()), list(train_e.values()), rtol=1e-5)
        # privacy/clip, privacy/noise_stddev and diagnostic/clipped_fraction where the mechanism has them.
        round_e = aggregation.round_metrics(plan, e.metrics["aggregator"], IDS)
        round_a = aggregation.round_metrics(plan, a.metrics["aggregator"], IDS)
        assert list(round_a) == list(round_e)
        np.testing.assert_allclose(list(round_a.values()), list(round_e.values()), rtol=1e-5)
        if zeroing_norm:
            assert a.metrics["aggregator"]["zeroed_count"] == e.metrics["aggregator"]["zeroed_count"]
        # The round's DpEvent in the aggregator's state: the same mechanism, so the same epsilon.
        assert _event(a.state) == _event(e.state)
    first = expected[0].metrics["aggregator"]
    if zeroing_norm:
        assert first["zeroed_count"] == 1  # 0.076 > 0.07 (see ZEROING)
    if mechanism is ADAPTIVE:
        # The clip moved after round 1 (the below-clip count of the members steered it), alike on both paths.
        assert aggregation.round_metrics(plan, first, IDS)["privacy/clip"] != pytest.approx(CLIP)
    if mechanism is FIXED:  # 1.05 and 1.01 > 0.8, of five
        assert aggregation.round_metrics(plan, first, IDS)["diagnostic/clipped_fraction"] == pytest.approx(2 / 5)


def _event(state) -> dp_accounting.DpEvent:
    """The round's DpEvent in a learning process's state (inside zeroing's wrapper if any)."""
    aggregator = state.aggregator
    if "inner_agg" in aggregator:
        aggregator = aggregator["inner_agg"]
    return differential_privacy.extract_dp_event_from_state(differential_privacy.DPAggregatorState(*aggregator))


def test_the_preclipped_query_sums_records_as_they_are_with_the_per_client_noise():
    clip, z, seed = 1.0, 0.5, 3
    preclipped = client_groups.PreclippedGaussianSumQuery(clip, z * clip, seed)
    per_client = aggregation.SeededGaussianSumQuery(clip, z * clip, seed)
    group_sum = [tf.constant([3.0, 4.0])]  # norm 5: two members' clipped updates cannot sum past 2C, three can reach 3C
    state = preclipped.initial_global_state()
    params = preclipped.derive_sample_params(state)
    record, _ = preclipped.preprocess_record(params, group_sum)
    np.testing.assert_array_equal(record[0], [3.0, 4.0])  # the per-client query would clip it to [0.6, 0.8]
    np.testing.assert_allclose(per_client.preprocess_record(params, group_sum)[0][0], [0.6, 0.8], rtol=1e-6)
    # Same noise as the per-client query on the same sum, and the same DP event (z = stddev / clip).
    zero = [tf.zeros(2)]
    noised_a, _, event_a = preclipped.get_noised_result((zero, tf.constant(0.0)), state)
    noised_b, _, event_b = per_client.get_noised_result((zero, tf.constant(0.0)), per_client.initial_global_state())
    np.testing.assert_array_equal(noised_a[0], noised_b[0])
    assert float(event_a.noise_multiplier) == float(event_b.noise_multiplier) == z


@pytest.mark.parametrize("mechanism", [FIXED, ADAPTIVE, TREE])
def test_the_grouped_query_preprocesses_each_real_member_as_the_per_client_query(mechanism):
    # Clip 1: [3, 4] (norm 5) is clipped to [0.6, 0.8], [0.3, 0.4] (norm 0.5) is not; the third row
    # is padding (mask 0), which would add [0.6, 0.8] and one more clipped update if it counted.
    dp = configs.DpConfig(mechanism=mechanism, clip=1.0)
    specs = (tf.TensorSpec([2], tf.float32),)
    inner = aggregation.build_query(dp, conftest.plan(mechanism, 0.5, 20), noise_seed=0, record_specs=specs)
    grouped = client_groups.GroupedQuery(inner)
    group = collections.OrderedDict(
        updates=(tf.constant([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]]),), mask=tf.constant([1.0, 1.0, 0.0])
    )
    state = grouped.initial_global_state()
    params = grouped.derive_sample_params(state)
    sample = grouped.preprocess_record(params, group)
    per_client = inner.initial_sample_state(specs)
    for member in ([3.0, 4.0], [0.3, 0.4]):  # the real members, each a record of its own
        per_client = inner.accumulate_record(params, per_client, (tf.constant(member),))
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), sample, per_client)
    clipped_sum = {FIXED: lambda s: s[0], ADAPTIVE: lambda s: s.sum_state, TREE: lambda s: s}[mechanism](sample)
    np.testing.assert_allclose(clipped_sum[0], [0.9, 1.2], rtol=1e-6)  # [0.6, 0.8] + [0.3, 0.4]
    if mechanism is FIXED:
        assert float(sample[1]) == 1.0  # one real member clipped
    if mechanism is ADAPTIVE:
        # The below-clip count, centred: (0 - 1/2) + (1 - 1/2) = 0; the padding row would make it -1/2.
        assert float(sample.quantile_estimator_state) == 0.0
    # The state, and so the noise and the DP event, are the inner query's own.
    assert tf.nest.map_structure(lambda t: t.shape, state) == tf.nest.map_structure(
        lambda t: t.shape, inner.initial_global_state()
    )


@pytest.mark.parametrize(
    "dp, compression, message",
    [
        (configs.DpConfig(mechanism=configs.Mechanism.DISTRIBUTED), False, "distributed DP mechanism has no grouped"),
        (configs.DpConfig(mechanism=NONE), True, "compression"),
    ],
)
def test_mechanisms_without_a_grouped_path_are_refused(dp, compression, message):
    distributed = {"bits": 18, "dimension": 48_670} if dp.mechanism is configs.Mechanism.DISTRIBUTED else {}
    plan = conftest.plan(dp.mechanism, 0.0 if dp.mechanism is NONE else 0.5, IDS, **distributed)
    with pytest.raises(client_groups.GroupingError, match=message):
        client_groups.build_factory(dp, plan, noise_seed=0, compression=compression)


def test_models_and_algorithms_without_a_grouped_path_are_refused(tiny_data_dir):
    task = _task(tiny_data_dir, "linear")
    fn = task.train_data.serializable_dataset_fn
    with pytest.raises(client_groups.GroupingError, match="Keras-wrapped .* convert it with create_functional_model"):
        client_groups.build_training_process(task.model_fn, algorithms.AlgorithmConfig(), fn, 2)
    with pytest.raises(client_groups.GroupingError, match="members stepping together run plain SGD steps, not fedprox"):
        fedprox = algorithms.AlgorithmConfig(algorithm=FEDPROX)
        client_groups.build_training_process(task.learning_model(), fedprox, fn, 2, batch_size=BATCH)
    batch_norm = conftest.emnist_task(tiny_data_dir, "tests.fusion_test:batch_norm_model")
    with pytest.raises(client_groups.GroupingError, match="non-trainable weights"):
        client_groups.create_functional_model(batch_norm)


@pytest.mark.parametrize(
    "preprocess",
    [
        {"epochs": 2, "shuffle_buffer": 5, "max_examples_per_client": 20, "batch_size": 3},  # taken, shuffled, twice
        {"epochs": 1, "shuffle_buffer": 1, "batch_size": 8},  # as read
        {"epochs": 2, "shuffle_buffer": 1, "batch_size": 5},  # as read, twice: all rows, then all again
    ],
    ids=["shuffled-2epochs-taken", "as-read", "unshuffled-2epochs"],
)
def test_the_group_read_gives_each_members_dataset_examples_in_its_order(tiny_data_dir, preprocess):
    task = conftest.emnist_task(tiny_data_dir, "linear", **preprocess)
    # Clients of different sizes (the tiny population's counts vary) and one without rows.
    ids = [*task.train_data.client_ids[:4], "nobody", *task.train_data.client_ids[4:6]]
    graph = tf.Graph()
    with graph.as_default():
        examples, counts = task.group_examples_fn(tf.constant(ids))
        per_member = [task.train_data.serializable_dataset_fn(tf.constant(i)) for i in ids]
        empty = tf.data.Dataset.from_tensors(
            collections.OrderedDict(x=tf.zeros([0, 28, 28, 1]), y=tf.zeros([0, 1], tf.int32))
        )
        per_member = [d.unbatch().batch(10**6).concatenate(empty).take(1).get_single_element() for d in per_member]
    with tf.compat.v1.Session(graph=graph) as session:
        examples, counts, per_member = session.run((examples, counts, per_member))
    assert task.group_examples_fn.batch_size == preprocess["batch_size"]
    assert counts.tolist() == [len(m["y"]) for m in per_member]
    assert counts[4] == 0 and len(set(counts.tolist())) > 2
    if preprocess["epochs"] == 2:  # every member's run is its rows twice
        assert all(c % 2 == 0 for c in counts)
    if "max_examples_per_client" in preprocess:  # at most 20 examples a client, twice
        assert max(counts) == 40
    # Bit for bit: the same examples, each member's in its dataset's (seeded, shuffled) order.
    np.testing.assert_array_equal(examples["x"], np.concatenate([m["x"] for m in per_member]))
    np.testing.assert_array_equal(examples["y"], np.concatenate([m["y"] for m in per_member]))


def test_dense_forward_gives_each_members_keras_output():
    from tffpipe import models

    keras_model = models.create_model("mlp", configs.Task.EMNIST, 62)
    forward = client_groups.create_dense_forward(keras_model)
    first = keras_model.get_weights()
    second = [0.5 * w + 0.01 for w in first]
    x = np.random.default_rng(0).random((2, 3, 28, 28, 1), dtype=np.float32)  # K = 2 members, B = 3
    stacked = tuple(tf.constant(np.stack([a, b])) for a, b in zip(first, second, strict=True))
    output = forward(stacked, tf.constant(x)).numpy()
    expected = []
    for member, weights in enumerate([first, second]):
        keras_model.set_weights(weights)
        expected.append(keras_model(x[member]).numpy())
    np.testing.assert_allclose(output, np.stack(expected), rtol=1e-5, atol=1e-6)
    # Convolutions have no dense formulation: they go through tf.vectorized_map.
    assert client_groups.create_dense_forward(models.create_model("small_cnn", configs.Task.EMNIST, 62)) is None


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "client_batching must be a positive group size, got 0"),
        ("-4", "client_batching must be a positive group size, got -4"),
        ("nan", "client_batching must be off, auto or a group size (a positive integer), got 'nan'"),
        ("51", "client_batching=51 is more than clients_per_round=50"),
    ],
)
def test_bad_group_sizes_name_the_parameter(value, message):
    with pytest.raises(validation.ConfigError, match=re.escape(message)) as raised:
        configs.ExperimentConfig(client_batching=value, clients_per_round=50)
    assert raised.value.field == "client_batching"


def test_an_explicit_group_size_is_refused_where_groups_cannot_run_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    compressed = {"dp.mechanism": NONE, "compression": True, "clients_per_round": 50}
    with pytest.raises(validation.ConfigError, match="client_batching=10 cannot run: compression and secure"):
        configs.build({**compressed, "client_batching": "10"})
    from tffpipe import models

    linear = models.create_model("linear", configs.Task.EMNIST, 62)
    auto = configs.build({**compressed, "client_batching": "auto"})
    assert client_groups.group_size(auto, linear) is None  # auto: per client, no error
    fixed = configs.build({"clients_per_round": 50, "client_batching": "auto", "runtime.local_workers": 2})
    assert client_groups.group_size(fixed, linear) == 25  # one group per worker and core: ceil(50 / 2)
    assert client_groups.group_size(configs.build({"client_batching": "off"}), linear) is None


# Short local work (5 epochs of at most 20 examples, batches of 20: 5 steps), where auto takes the shared path.
SHORT = {"preprocess.max_examples_per_client": 20}


def test_members_step_on_the_shared_weights_by_default_only_for_short_plain_sgd_on_dense_stacks():
    from tffpipe import models

    def reason(model, **values):
        config = configs.build({"model": model, "client_batching": "auto", **SHORT, **values})
        return client_groups.shared_obstacle(config, models.create_model(model, configs.Task.EMNIST, 62))

    assert reason("linear") is None  # Flatten, Dense(62): FedAvg's plain SGD steps, 5 epochs of one batch
    # The default population: up to 600 examples, 5 epochs of 20: 150 steps, whose corrections grow as their square.
    assert "local steps up to 150" in reason("linear", **{"preprocess.max_examples_per_client": -1})
    assert "unbounded" in reason("linear", **{"preprocess.max_examples_per_client": -1, "data.data_dir": "/data"})
    assert reason("linear", **{"algorithm.algorithm": FEDADAM}) is None  # the same client work
    assert reason("mlp") is None  # ReLU too: a unit within rounding of 0 may flip (rules.shared_obstacle)
    assert reason("small_cnn") == "not a stack of Flatten and Dense layers"
    assert "fedprox" in reason("linear", **{"algorithm.algorithm": FEDPROX})
    assert "fedsgd" in reason("linear", **{"algorithm.algorithm": FEDSGD, "dp.mechanism": NONE})
    assert "canaries" in reason("linear", **{"privacy.canaries": 2})


def test_groups_that_send_their_members_stay_under_the_memory_budget(tiny_data_dir, monkeypatch):
    from tffpipe import models

    keras_model = models.create_model("linear", configs.Task.EMNIST, 62)
    update = models.weight_bytes(keras_model.trainable_weights)
    assert update == 4 * (28 * 28 * 62 + 62) == 194_680
    adaptive = {
        "model": "linear",
        "dp.mechanism": ADAPTIVE,
        "dp.noise_multiplier": 0.5,
        "clients_per_round": 100,
        **SHORT,
    }
    over, fits, auto = (configs.build({**adaptive, "client_batching": k}) for k in ("65", "64", "auto"))
    fixed = configs.build({**adaptive, "dp.mechanism": FIXED, "client_batching": "65"})
    # Tree aggregation and zeroing are no obstacle to an explicit K either (`configs.client_batching_obstacle`).
    tree = configs.build({**adaptive, "dp.mechanism": TREE, "dp.zeroing_norm": 1.0, "client_batching": "10"})
    assert tree.client_batching == "10" and configs.group_sends_members(tree.dp)
    monkeypatch.setattr(configs, "memory_bytes", lambda: 100_000_000)
    # One worker's group gets half of 100 MB for 4 copies of K updates: 50,000,000 // (4 x 194,680) = 64.
    assert configs.member_group_limit(over, update) == 64
    with pytest.raises(client_groups.GroupingError, match=r"client_batching=65 cannot run: .* use at most 64, or auto"):
        client_groups.check_model(over, keras_model)
    client_groups.check_model(fits, keras_model)
    client_groups.check_model(fixed, keras_model)  # fixed clipping sends one clipped sum per group: no bound
    assert configs.member_group_limit(fixed, update) is None
    # auto on one core: one group per worker, ceil(100 / 1), capped at the 64 that fit.
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert client_groups.group_size(auto, keras_model) == 64
    # On two cores linear's members step on the shared weights, one group per core: ceil(100 / 2) = 50,
    # and the one worker's budget is shared by its two groups: 64 * 1 // 2 = 32.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert client_groups.group_size(auto, keras_model) == 32


def test_the_process_builder_groups_with_client_batching_and_not_without(tiny_data_dir, tff_context, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    task = _task(tiny_data_dir, "linear")
    plan = conftest.plan(NONE, 0.0, 3, population=12)
    config = configs.build({"clients_per_round": 3, "dp.mechanism": NONE, "client_batching": "auto", **SHORT})
    grouped = algorithms.build_learning_process(task, config, plan)
    # linear's members step on the shared weights: one group per core, ceil(3 / 2).
    assert isinstance(grouped, client_groups.GroupedLearningProcess) and grouped.group_size == 2
    per_client = algorithms.build_learning_process(task, dataclasses.replace(config, client_batching="off"), plan)
    assert not isinstance(per_client, client_groups.GroupedLearningProcess)
    # The same state type: a checkpoint of either restores into the other.
    assert grouped.initialize.type_signature == per_client.initialize.type_signature


def test_the_train_binary_refuses_bad_client_batching_before_any_data(forks, tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    cases = [
        (["--client_batching=0"], "--client_batching=0: client_batching must be a positive group size, got 0"),
        (
            ["--client_batching=2", "--model=tests.fusion_test:batch_norm_model"],
            "--client_batching=2: client_batching=2 cannot run: model tests.fusion_test:batch_norm_model: it has non-",
        ),
        (
            ["--client_batching=2", "--dp=none", "--compression"],
            "--client_batching=2: client_batching=2 cannot run: compr",
        ),
    ]
    # A tiny population and one round, so that a check that does not fire ends quickly (with files written).
    tiny = ["--num_writers=12", "--median_examples=24", "--clients_per_round=3", "--eval_clients=0", "--rounds=1"]

    args = [[f"--cache_dir={cache}", f"--root_dir={runs}", *tiny, *flags] for flags, _ in cases]
    results = forks.run([("train", a) for a in args])  # forked from one process that imported TF (tests/forkserver.py)
    for (flags, message), proc in zip(cases, results, strict=True):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), (flags, proc)
    assert not cache.exists() and not runs.exists()  # no data generated, no run directory


# The surroundings of a group (issue 21): canaries, several workers, the device model, auto's note.


def _experiment_processes(task, values: dict, group_size: int):
    """(config, plan, per-client process, grouped process) as `algorithms.build_learning_process` builds them."""
    config = configs.build({"model": "linear", "seed": 3, "client_batching": str(group_size), **values})
    plan = accounting.create_plan(config, population=len(task.train_data.client_ids) + config.privacy.canaries)
    grouped = algorithms.build_learning_process(task, config, plan)
    assert isinstance(grouped, client_groups.GroupedLearningProcess)
    per_client = algorithms.build_learning_process(task, dataclasses.replace(config, client_batching="off"), plan)
    return config, plan, per_client, grouped


def test_the_process_builder_groups_tree_aggregation_with_zeroing_as_per_client(tiny_data_dir, tff_context):
    # What `program` builds: both processes from the config, the noise seeded by the config's seed.
    task = _task(tiny_data_dir, "linear")
    values = {"clients_per_round": 5, "dp.mechanism": TREE, "dp.noise_multiplier": 0.3, "dp.zeroing_norm": ZEROING}
    values["loop.rounds"] = 2  # the tree's clients take part at most once: 2 rounds of 5 from 12
    _, plan, per_client, grouped = _experiment_processes(task, values, group_size=2)
    assert grouped.group_size == 2
    # The same state type, so a checkpoint of either restores into the other. Compared as text: dp_accounting
    # makes a new namedtuple class for the DpEvent in each built factory, so even two per-client builds'
    # types differ in that Python class (checked on 2026-12-05), not in their structure.
    assert str(grouped.initialize.type_signature) == str(per_client.initialize.type_signature)
    ids = task.train_data.client_ids[:5]
    state = per_client.initialize()
    expected, actual = per_client.next(state, ids), grouped.next(state, ids)
    _assert_weights_close(per_client, expected.state, grouped, actual.state)  # the same noise, z*C = 0.3 * C
    _assert_same_round(plan, ids, expected, actual)
    assert actual.metrics["aggregator"]["zeroed_count"] == expected.metrics["aggregator"]["zeroed_count"]


def _assert_same_round(plan, ids, expected, actual):
    """The same train metrics and the same mechanism metrics (clip, noise, clipped fraction) as `program` reads them."""
    train_e, train_a = expected.metrics["client_work"]["train"], actual.metrics["client_work"]["train"]
    np.testing.assert_allclose(list(train_a.values()), list(train_e.values()), rtol=1e-5)
    mechanism_e = aggregation.round_metrics(plan, expected.metrics["aggregator"], len(ids))
    mechanism_a = aggregation.round_metrics(plan, actual.metrics["aggregator"], len(ids))
    assert list(mechanism_a) == list(mechanism_e)
    np.testing.assert_allclose(list(mechanism_a.values()), list(mechanism_e.values()), rtol=1e-5)
    assert actual.metrics["client_work"]["groups"]["clients"] == len(ids)


@pytest.fixture(scope="module")
def two_workers():
    """Two local workers, kept for the module; `start()` installs their context (each test restores its own)."""
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    from tffpipe import runtime

    context = context_stack_impl.context_stack.current
    workers = runtime.create(local_workers=2)
    try:
        yield workers
    finally:
        workers.stop()
        context_stack_impl.context_stack.set_default_context(context)


@pytest.mark.parametrize("mechanism", [NONE, FIXED, ADAPTIVE])
def test_canaries_in_groups_over_two_workers_give_the_per_client_rounds_on_one(
    tiny_data_dir, tff_context, two_workers, mechanism
):
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    task = _task(tiny_data_dir, "linear")
    values = {"clients_per_round": 6, "privacy.canaries": 2, "dp.mechanism": mechanism, "dp.clip": CLIP}
    if mechanism is FIXED:
        values.update({"dp.noise_multiplier": NOISE, "algorithm.algorithm": FEDADAM})
    if mechanism is ADAPTIVE:  # members sent stacked, each preprocessed by the server's query; its noise is unseeded
        values.update({"dp.noise_multiplier": 0.0, "dp.zeroing_norm": ZEROING})
    config, plan, per_client, grouped = _experiment_processes(task, values, group_size=2)
    real, (canary_0, canary_1) = task.train_data.client_ids, audit.canary_ids(2)
    # Canaries share groups with real clients: [c0, a], [b, c1], [c, d] over two workers in round 1; in
    # round 2 one group, [c1, e], is all there is, so one of the two workers has no client.
    rounds = [[canary_0, real[0], real[1], canary_1, real[2], real[3]], [canary_1, real[4]]]
    state = per_client.initialize()
    expected = []
    for ids in rounds:
        expected.append(per_client.next(state if not expected else expected[-1].state, ids))
    context = context_stack_impl.context_stack.current
    try:
        two_workers.start()
        actual = []
        for ids in rounds:
            actual.append(grouped.next(state if not actual else actual[-1].state, ids))
    finally:
        context_stack_impl.context_stack.set_default_context(context)
    for ids, e, a in zip(rounds, expected, actual, strict=True):
        _assert_weights_close(per_client, e.state, grouped, a.state)
        _assert_same_round(plan, ids, e, a)
    if mechanism is FIXED:
        # A canary's update is 1e4 times the clip: clipped wherever it goes, so each round counts at least its
        # canaries among the clipped (round 1: 2 of 6, round 2: 1 of 2).
        fractions = [
            aggregation.round_metrics(plan, a.metrics["aggregator"], len(ids))
            for ids, a in zip(rounds, actual, strict=True)
        ]
        assert (
            fractions[0]["diagnostic/clipped_fraction"] >= 2 / 6
            and fractions[1]["diagnostic/clipped_fraction"] >= 1 / 2
        )
    elif mechanism is NONE:
        # Without DP nothing clips a canary: its update (norm 1e4 times the clip, weight 1) outweighs the real
        # clients' (norm ~1, ~20 examples each), so the model moved along c0 + c1, at cosine ~1/sqrt(2) with each
        # direction; a null direction's cosine is ~N(0, 1/d), d = 48,670.
        initial = audit.trainable_weights(state)
        tracker = audit.CanaryAudit(2, initial, algorithms.audit_seed(config.seed))
        cosines = tracker.cosines(
            np.concatenate([w.ravel() for w in audit.trainable_weights(actual[0].state)])
            - np.concatenate([w.ravel() for w in initial])
        )
        assert cosines[0] + cosines[1] > 1.0 and abs(cosines[2]) < 0.1


def _profile(client_id: str, examples_per_second: float, dropout_probability: float):
    from tffpipe import devices

    return devices.DeviceProfile(
        client_id=client_id,
        tier="mid",
        examples_per_second=examples_per_second,
        upload_bytes_per_second=1e9,
        download_bytes_per_second=1e9,
        utc_offset_hours=0.0,
        window_start_hour=0.0,
        window_hours=24.0,  # always available: who takes part depends on dropouts and the deadline only
        dropout_probability=dropout_probability,
    )


def test_device_model_rounds_in_groups_give_the_per_client_rounds(tiny_data_dir, tff_context):
    from tffpipe import devices

    task = _task(tiny_data_dir, "linear")
    ids = sorted(task.train_data.client_ids)
    # Every third device is slow (0.01 examples/s: a ~20-example client needs ~2,000 simulated seconds, past
    # the 100 s deadline), every other one drops out half the time; the rest report.
    profiles = {cid: _profile(cid, 0.01 if i % 3 == 0 else 1e4, 0.5 if i % 2 else 0.0) for i, cid in enumerate(ids)}
    counts = {cid: 20 for cid in ids}
    device_config = configs.DeviceConfig(overselect=1.0, deadline_seconds=100.0)
    rounds = devices.DeviceRounds(
        profiles,
        counts,
        clients_per_round=5,
        epochs=1,
        model_bytes=1000,
        update_bytes=1000,
        model_parameters=devices.REFERENCE_PARAMETERS,
        config=device_config,
        seed=1,
    )
    outcomes = [rounds.outcome(r) for r in (1, 2)]
    # Round 1 asks 10 of 12 devices; the seed makes some drop and some miss the deadline.
    assert all(o.dropped and o.late and o.reported for o in outcomes), outcomes
    per_client, grouped = _processes(task, FEDAVG, FIXED, group_size=2)
    plan = conftest.plan(FIXED, NOISE, 5)
    state = per_client.initialize()
    expected_state = actual_state = state
    for r, outcome in zip((1, 2), outcomes, strict=True):
        sampled = rounds.sample(r)
        assert sampled == list(outcome.reported)  # neither the dropped nor the late reach the process
        expected, actual = per_client.next(expected_state, sampled), grouped.next(actual_state, sampled)
        _assert_weights_close(per_client, expected.state, grouped, actual.state)
        _assert_same_round(plan, sampled, expected, actual)
        # The device metrics count real clients: bytes per reporting device, not per group.
        assert outcome.metrics()["system/bytes_up"] == 1000 * actual.metrics["client_work"]["groups"]["clients"]
        expected_state, actual_state = expected.state, actual.state


@pytest.mark.parametrize(
    "values, grouped, reason",
    [
        ({"dp.mechanism": configs.Mechanism.DISTRIBUTED}, False, "distributed DP needs each real client's own"),
        ({"dp.mechanism": NONE, "compression": True}, False, "compression and secure aggregation act on each"),
        ({"model": "small_cnn"}, False, "model small_cnn is convolutional, and convolutional models measured no"),
        # A dense model with canaries groups (each canary member replaced in the group's call).
        ({"privacy.canaries": 4, "model": "mlp"}, True, None),
    ],
)
def test_auto_says_in_one_line_why_a_run_goes_per_client(values, grouped, reason):
    from tffpipe import models

    config = configs.build({"clients_per_round": 10, "client_batching": "auto", **values})
    process = object.__new__(client_groups.GroupedLearningProcess) if grouped else object()
    note = client_groups.auto_note(config, process, lambda: models.create_model(config.model, config.task, 62))
    if reason is None:
        assert note is None
    else:
        assert note.startswith(f"client_batching=auto runs per client: {reason}") and "\n" not in note
    # Off, or an explicit K (refused or noted by `configs` itself), never gets this note.
    off = dataclasses.replace(config, client_batching="off")
    assert client_groups.auto_note(off, object(), lambda: models.create_model(config.model, config.task, 62)) is None
    # The same reason decides the group size: auto groups exactly where there is none to note.
    keras_model = models.create_model(config.model, config.task, 62)
    assert (client_groups.group_size(config, keras_model) is None) == (reason is not None)


# Five users' messages; "zebra" is out of vocabulary, so the masks (padding, end of
# sentence, the out-of-vocabulary bucket) all act on the loss and the accuracies.
KEYBOARD_VOCAB = ["the", "a", "cat", "dog", "runs"]
KEYBOARD_TEXTS = {
    "u0": ["the cat runs", "a dog", "the dog runs fast", "cat"],
    "u1": ["a cat runs", "the the dog"],
    "u2": ["dog runs", "a cat", "the cat", "runs runs", "a dog runs", "cat cat"],
    "u3": ["the zebra runs"],
    "u4": ["a", "the dog", "cat runs"],
}


def _keyboard_task():
    """The keyboard task's pipeline (seeded shuffle, vocabulary table, masks) and its cifg_lstm on five users."""
    from tffpipe import models
    from tffpipe.tasks import base
    from tffpipe.tasks.keyboard import task as keyboard_task

    text = configs.TextConfig(vocab_size=len(KEYBOARD_VOCAB), sequence_length=5)
    ids = sorted(KEYBOARD_TEXTS)
    rows = [
        [
            tf.train.Example(
                features=tf.train.Features(
                    feature={"tokens": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}
                )
            ).SerializeToString()
            for t in KEYBOARD_TEXTS[cid]
        ]
        for cid in ids
    ]

    def rows_fn(client_id):
        # No lookup table here: an unknown id (a client without examples) gets the empty last row.
        match = tf.cast(tf.where(tf.equal(tf.constant(ids), client_id))[:, 0], tf.int32)
        table = tf.ragged.constant([*rows, []], dtype=tf.string)
        return tf.data.Dataset.from_tensor_slices(table[tf.concat([match, [len(ids)]], 0)[0]])

    raw = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(ids, rows_fn)
    preprocess = configs.PreprocessConfig(epochs=1, batch_size=2, shuffle_buffer=4)
    train = raw.preprocess(keyboard_task.create_train_fn(text, preprocess, KEYBOARD_VOCAB, seed=3))
    classes = len(KEYBOARD_VOCAB) + text.num_oov_buckets + 3  # pad, bos, eos
    return base.Task(
        kind=configs.Task.KEYBOARD,
        train_data=train,
        test_data=train,
        model_name="cifg_lstm",
        model_info=models.describe("cifg_lstm", models.create_model("cifg_lstm", configs.Task.KEYBOARD, classes)),
        num_classes=classes,
        loss_fn=lambda: keyboard_task.MaskedCrossEntropy(0),
        metrics_fn=lambda: keyboard_task.create_metrics(text),
        sample_fn=lambda seed: {},
    )


def test_keyboard_lstm_groups_give_the_per_client_round_with_a_group_of_one_and_an_empty_member(tff_context):
    task = _keyboard_task()
    per_client, grouped = _processes(task, FEDAVG, NONE, group_size=2)
    ids = sorted(KEYBOARD_TEXTS)
    state = per_client.initialize()
    (expected,) = _run(per_client, 1, ids, state)
    # Groups of 2, 2, 2 with "nobody" (no examples) among them; then groups of one.
    (with_empty,) = _run(grouped, 1, [*ids[:3], "nobody", *ids[3:]], state)
    (of_one,) = _run(grouped.with_group_size(1), 1, ids, state)
    train_e = expected.metrics["client_work"]["train"]
    # The Keras-wrapped model's metrics, in its order; 16 sequences in 9 batches of at most 2 (4 + 2 + 6 + 1 + 3 rows).
    assert list(train_e) == [
        "accuracy",
        "top3_accuracy",
        "perplexity",
        "num_tokens",
        "loss",
        "num_examples",
        "num_batches",
    ]
    assert (train_e["num_examples"], train_e["num_batches"]) == (16, 9)
    for actual in (with_empty, of_one):
        _assert_weights_close(per_client, expected.state, grouped, actual.state)
        train_a = actual.metrics["client_work"]["train"]
        assert list(train_a) == list(train_e)
        np.testing.assert_allclose(list(train_a.values()), list(train_e.values()), rtol=1e-5)
    assert with_empty.metrics["client_work"]["groups"]["clients"] == 6


def test_auto_groups_by_model_kind_as_measured(monkeypatch):
    from tffpipe import models

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    config = configs.build({"clients_per_round": 10, "client_batching": "auto", "dp.mechanism": NONE, **SHORT})
    assert client_groups.model_kind(models.create_model("mlp", configs.Task.EMNIST, 62)) == "dense"
    # Dense whose members step on the shared weights (mlp, linear): one group per core, ceil(10 / 2) = 5.
    assert client_groups.group_size(config, models.create_model("mlp", configs.Task.EMNIST, 62)) == 5
    assert client_groups.group_size(config, models.create_model("linear", configs.Task.EMNIST, 62)) == 5
    # Dense whose members run one after the other (FedProx's proximal steps): one group per worker, 10.
    prox = dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, algorithm=FEDPROX))
    assert client_groups.group_size(prox, models.create_model("mlp", configs.Task.EMNIST, 62)) == 10
    # Convolutional: measured no faster in groups, so per client.
    assert client_groups.group_size(config, models.create_model("small_cnn", configs.Task.EMNIST, 62)) is None
    # Recurrent: one group per core, ceil(10 / max(1 worker, 2 cores)) = 5.
    lstm = models.create_model("cifg_lstm", configs.Task.KEYBOARD, 9)
    assert client_groups.model_kind(lstm) == "recurrent"
    assert client_groups.group_size(config, lstm) == 5


@pytest.mark.parametrize("model", ["small_cnn", "linear"])
def test_a_run_starts_from_the_same_initial_weights_grouped_per_client_and_when_auto_falls_back(
    tiny_data_dir, tff_context, model
):
    # Keras seeds each initializer from the run's seed in the order models are built, and TF draws
    # differently in a graph than eagerly: the models the grouped path builds to decide and convert
    # must not move the per-client path's draws, and its initial weights come from the same trace.
    task = _task(tiny_data_dir, model)
    config = configs.build({"model": model, "seed": 3, "clients_per_round": 5, "loop.rounds": 1})
    plan = accounting.create_plan(config, population=len(task.train_data.client_ids))

    def initial_weights(client_batching):
        tf.keras.utils.set_random_seed(config.seed)  # as `program.prepare` does before the task's models
        process = algorithms.build_learning_process(
            task, dataclasses.replace(config, client_batching=client_batching), plan
        )
        return process, process.get_model_weights(process.initialize()).trainable

    per_client, expected = initial_weights("off")
    grouped, actual = initial_weights("2")
    assert isinstance(grouped, client_groups.GroupedLearningProcess) and per_client is not grouped
    for a, b in zip(expected, actual, strict=True):
        np.testing.assert_array_equal(a, b)
    # small_cnn under auto runs per client (a convolutional model): it starts where `off` does.
    fallback, fallen_back = initial_weights("auto")
    assert isinstance(fallback, client_groups.GroupedLearningProcess) == (model == "linear")
    for a, b in zip(expected, fallen_back, strict=True):
        np.testing.assert_array_equal(a, b)
