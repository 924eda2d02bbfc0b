"""tffpipe's in-place serialization gives TFF's bytes, on every state tffpipe builds; shared bytes are made once."""

import collections
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import array_pb2, data_type_pb2, executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import computation_types, placements
from tensorflow_federated.python.core.impl.utils import tensorflow_utils

from tests import conftest
from tffpipe import accounting, algorithms, audit, client_groups, configs, models, serialization
from tffpipe.tasks.keyboard import task as keyboard_task

Algorithm, Mechanism = configs.Algorithm, configs.Mechanism

# Each algorithm's state, each aggregator's inside one of them (10 processes, not 20: building
# one takes 2-5 s), canaries (ids in the round's argument, zeroing in their transform), and a
# grouped process (client groups: its own client work, the per-client state type).
FIXED = {"dp.mechanism": Mechanism.FIXED, "dp.noise_multiplier": 0.5}
STATES = {
    "fedavg, compression": {
        "algorithm.algorithm": Algorithm.FEDAVG,
        "dp.mechanism": Mechanism.NONE,
        "compression": True,
    },
    "fedavgm, fixed clipping, zeroing, canaries": {
        "algorithm.algorithm": Algorithm.FEDAVGM,
        **FIXED,
        "dp.zeroing_norm": 3.0,
        "privacy.canaries": 2,
    },
    "fedadam, fixed clipping": {"algorithm.algorithm": Algorithm.FEDADAM, **FIXED},
    # z = 0.2: adaptive clipping's count noise needs z < 0.1 * clients_per_round (`configs`).
    "fedyogi, adaptive clipping": {
        "algorithm.algorithm": Algorithm.FEDYOGI,
        "dp.mechanism": Mechanism.ADAPTIVE,
        "dp.noise_multiplier": 0.2,
    },
    # 2 rounds: the tree uses each of the 12 clients at most once.
    "fedadagrad, DP-FTRL tree": {
        "algorithm.algorithm": Algorithm.FEDADAGRAD,
        **FIXED,
        "dp.mechanism": Mechanism.TREE,
        "loop.rounds": 2,
    },
    # z = 1: at 0.5, 20 bits would be refused for this model and cohort (`accounting.check_usable_bits`).
    "fedprox, distributed DP": {
        "algorithm.algorithm": Algorithm.FEDPROX,
        "dp.mechanism": Mechanism.DISTRIBUTED,
        "dp.noise_multiplier": 1.0,
    },
    "fedsgd": {"algorithm.algorithm": Algorithm.FEDSGD, "dp.mechanism": Mechanism.NONE},
    "fedavg, secure aggregation": {"dp.mechanism": Mechanism.NONE, "secure_aggregation": True},
    "fedavg, distributed DP, Skellam": {
        "dp.mechanism": Mechanism.DISTRIBUTED,
        "dp.noise_multiplier": 1.0,
        "dp.distributed_noise": configs.DistributedNoise.SKELLAM,
    },
    "fedavg, client groups of 2, fixed clipping": {**FIXED, "client_batching": "2"},
}


def _tff_bytes(value, type_spec) -> bytes:
    return value_serialization.serialize_value(value, type_spec)[0].SerializeToString(deterministic=True)


def _tffpipe_bytes(value, type_spec) -> bytes:
    # What the remote executor sends: the default (not the deterministic) serialization.
    return serialization.serialize_value(value, type_spec)[0].SerializeToString()


@pytest.fixture(scope="module")
def next_arguments(tiny_data_dir, tff_context):
    """{name: (state, client ids, next's parameter type)}, each process built once for the module."""
    task = conftest.emnist_task(tiny_data_dir, "linear")
    found = {}
    for name, values in STATES.items():
        config = configs.build({"model": "linear", "clients_per_round": 3, "seed": 3, **values})
        plan = accounting.create_plan(config, population=len(task.train_data.client_ids), model_size=lambda: 785 * 62)
        process = algorithms.build_learning_process(task, config, plan)
        ids = task.train_data.client_ids[:3] + audit.canary_ids(config.privacy.canaries)
        if isinstance(process, client_groups.GroupedLearningProcess):
            ids = client_groups.pack(ids, process.group_size)  # one TFF client carries a group's ids
        found[name] = (process.initialize(), ids, process.next.type_signature.parameter)
    return found


@pytest.mark.parametrize("name", STATES)
def test_a_states_bytes_and_a_rounds_argument_equal_tffs(next_arguments, name, monkeypatch):
    state, ids, (state_type, ids_type) = next_arguments[name]
    left_to_tff = []
    with_tff = serialization._with_tff
    monkeypatch.setattr(serialization, "_with_tff", lambda out, v, t: left_to_tff.append((v, t)) or with_tff(out, v, t))
    assert _tffpipe_bytes(state, state_type) == _tff_bytes(state, state_type)
    if isinstance(ids_type.member, computation_types.SequenceType):
        # A group's ids go to TFF's serializer whole, as a tf.data graph whose node names
        # change with every call (TFF's bytes differ from TFF's): compared by what they hold.
        sent = executor_pb2.Value.FromString(_tffpipe_bytes(ids, ids_type))
        received, _ = value_serialization.deserialize_value(sent, ids_type)
        assert [[x.decode() for x in d.as_numpy_iterator()] for d in received] == ids
        groups = [v for v, t in left_to_tff if isinstance(t, computation_types.SequenceType)]
        assert len(groups) == len(ids)  # each group went to TFF's serializer, as one dataset
        left_to_tff = [(v, t) for v, t in left_to_tff if not isinstance(t, computation_types.SequenceType)]
    else:
        assert _tffpipe_bytes(ids, ids_type) == _tff_bytes(ids, ids_type)
    # The in-place path did the rest: TFF only got scalars and the ids, no struct and no array.
    assert left_to_tff
    for v, t in left_to_tff:
        assert isinstance(t, computation_types.TensorType) and (np.ndim(v) == 0 or t.dtype.type is np.str_), (v, t)


def test_the_keyboard_models_fedadam_state_equals_tffs(tff_context):
    # The CIFG LSTM as `models` builds it (custom cell, tied embedding), at a 6-word vocabulary.
    def model_fn():
        return tff.learning.models.from_keras_model(
            models.create_cifg_lstm(6),
            loss=keyboard_task.MaskedCrossEntropy(0),
            input_spec=(tf.TensorSpec([None, 4], tf.int64), tf.TensorSpec([None, 4], tf.int64)),
        )

    process = algorithms.build_training_process(model_fn, configs.AlgorithmConfig(algorithm=Algorithm.FEDADAM))
    state_type = process.next.type_signature.parameter[0]
    state = process.initialize()
    # 3 x (192 x 670 + 670) gate weights + 670 x 96 projection + 6 x 96 embedding + 6 output bias.
    weights = process.get_model_weights(state).trainable
    assert sum(np.size(w) for w in weights) == 387_930 + 64_320 + 576 + 6
    assert _tffpipe_bytes(state, state_type) == _tff_bytes(state, state_type)


T = computation_types.TensorType
EDGES = {
    "empty struct": ((), computation_types.StructType([])),
    "empty array": (np.zeros((0, 3), np.float32), T(np.float32, [0, 3])),
    "0-d array, unknown rank": (np.full((), 2.0), T(np.float64, None)),
    "strided view": (np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2], T(np.int32, [3, None])),
    "bools": (np.array([True, False]), T(np.bool_, [2])),
    "names from the type, not the container": (
        collections.OrderedDict(x=np.ones(2, np.float32), y=[]),
        computation_types.StructType([("a", T(np.float32, [2])), ("b", computation_types.StructType([]))]),
    ),
    "no clients": ([], computation_types.FederatedType(np.str_, placements.CLIENTS)),
    "arrays at clients": (
        [np.ones(2, np.float32), np.zeros(2, np.float32)],
        computation_types.FederatedType(T(np.float32, [2]), placements.CLIENTS),
    ),
}


@pytest.mark.parametrize("name", EDGES)
def test_edge_cases_equal_tffs(name):
    value, type_spec = EDGES[name]
    assert _tffpipe_bytes(value, type_spec) == _tff_bytes(value, type_spec)


def test_a_value_all_workers_receive_is_serialized_once_per_invocation(monkeypatch):
    calls = []
    serialize = serialization.serialize_value
    monkeypatch.setattr(serialization, "serialize_value", lambda v, t: calls.append(t) or serialize(v, t))
    state_type = computation_types.FederatedType(T(np.float32, [3]), placements.SERVER)
    state = np.arange(3, dtype=np.float32)
    shared = serialization.SharedValues()
    results = []
    threads = [threading.Thread(target=lambda: results.append(shared.serialize(state, state_type))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # four workers, one serialization
    assert {r[0] for r in results} == {_tff_bytes(state, state_type)}
    shared.serialize(state.copy(), state_type)  # equal values, another object: serialized again
    assert len(calls) == 2
    shared.clear()  # the invocation ended
    shared.serialize(state, state_type)
    assert len(calls) == 3
    # A slice of clients differs per worker: not kept, whatever its leaves.
    ids, ids_type = ["a", "b"], computation_types.FederatedType(np.str_, placements.CLIENTS)
    assert shared.serialize(ids, ids_type)[0] == shared.serialize(ids, ids_type)[0] == _tff_bytes(ids, ids_type)
    assert len(calls) == 5 and len(shared._entries) == 1


def test_the_same_state_object_is_found_without_walking_its_leaves_again(monkeypatch):
    # The mergeable context hands every worker the same state object under the same type object:
    # walking its leaves (a tree of from_container calls) for each worker was W1's largest Python item.
    walked = []
    walk = serialization._leaves
    monkeypatch.setattr(serialization, "_leaves", lambda v, t, found: walked.append(t) or walk(v, t, found))
    state_type = computation_types.FederatedType(
        computation_types.StructType([("w", T(np.float32, [3])), ("b", T(np.float32, [2]))]), placements.SERVER
    )
    state = collections.OrderedDict(w=np.arange(3, dtype=np.float32), b=np.ones(2, np.float32))
    shared = serialization.SharedValues()
    first = shared.serialize(state, state_type)
    assert shared.serialize(state, state_type)[0] is first[0]
    assert walked.count(state_type) == 1  # the second worker's lookup did not walk it
    rebuilt = collections.OrderedDict(state)  # the same leaves in another container: found by its leaves
    assert shared.serialize(rebuilt, state_type)[0] is first[0]
    assert walked.count(state_type) == 2
    assert first[0] == _tff_bytes(state, state_type)


def test_a_create_value_request_from_bytes_equals_the_proto():
    value = value_serialization.serialize_value(np.ones(200, np.float32), T(np.float32, [200]))[0]
    executor = executor_pb2.ExecutorId(id="7")
    expected = executor_pb2.CreateValueRequest(executor=executor, value=value).SerializeToString(deterministic=True)
    assert (
        serialization.create_value_request(value.SerializeToString(), executor) == expected
    )  # 800 bytes: a 2-byte length


def test_the_evaluation_state_and_argument_equal_tffs(tiny_data_dir, tff_context):
    # Every evaluation (periodic, final, on stop) sends the model and the ids to the workers.
    task = conftest.emnist_task(tiny_data_dir, "linear")
    process = task.compose_eval(algorithms.build_evaluation_process(task.learning_model(), per_client=True))
    state_type, ids_type = process.next.type_signature.parameter
    state, ids = process.initialize(), sorted(task.test_data.client_ids)[:3]
    assert _tffpipe_bytes(state, state_type) == _tff_bytes(state, state_type)
    assert _tffpipe_bytes(ids, ids_type) == _tff_bytes(ids, ids_type)


def test_a_computation_is_serialized_once_as_tff_serializes_it(monkeypatch):
    # The context sends the same compiled computation to each worker every round.
    @tff.tensorflow.computation(T(np.float32, [3]))
    def double(x):
        return x * 2

    @tff.tensorflow.computation(T(np.float32, [3]))
    def triple(x):
        return x * 3

    calls = []
    serialize = serialization.serialize_value
    monkeypatch.setattr(serialization, "serialize_value", lambda v, t: calls.append(v) or serialize(v, t))
    computations = serialization.SerializedComputations()  # a context's own
    first, value_type = serialization.serialize_to_bytes(double, double.type_signature, computations)
    assert first == _tff_bytes(double, double.type_signature)
    assert value_type == double.type_signature
    again, _ = serialization.serialize_to_bytes(double, double.type_signature, computations)
    assert again is first and len(calls) == 1
    other = serialization.serialize_to_bytes(triple, triple.type_signature, computations)[0]
    assert other == _tff_bytes(triple, triple.type_signature)
    assert len(calls) == 2
    # Another context (a new run's) keeps its own: nothing outlives the context that made it.
    serialization.serialize_to_bytes(double, double.type_signature, serialization.SerializedComputations())
    assert len(calls) == 3


def test_workers_asking_for_a_computation_at_once_wait_for_one_serialization(monkeypatch):
    # At round 1 every worker's thread sends the same computation at the same time.
    @tff.tensorflow.computation(T(np.float32, [3]))
    def double(x):
        return x * 2

    calls, started = [], threading.Event()
    serialize = serialization.serialize_value

    def slow(v, t):
        calls.append(v)
        started.set()
        time.sleep(0.2)  # the other threads ask meanwhile
        return serialize(v, t)

    monkeypatch.setattr(serialization, "serialize_value", slow)
    computations, results = serialization.SerializedComputations(), []
    ask = lambda: results.append(computations.serialize(double, double.type_signature)[0])  # noqa: E731
    first = threading.Thread(target=ask)
    first.start()
    started.wait()
    others = [threading.Thread(target=ask) for _ in range(3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    assert len(calls) == 1
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert results[0] == _tff_bytes(double, double.type_signature)


def test_the_same_leaves_under_another_type_are_serialized_for_that_type(monkeypatch):
    # The cache is keyed on the leaves; a hit must also be for an equal type.
    calls = []
    serialize = serialization.serialize_value
    monkeypatch.setattr(serialization, "serialize_value", lambda v, t: calls.append(t) or serialize(v, t))
    state = np.arange(3, dtype=np.float32)
    shared = serialization.SharedValues()
    first = shared.serialize(state, computation_types.FederatedType(T(np.float32, [3]), placements.SERVER))
    again = shared.serialize(state, computation_types.FederatedType(T(np.float32, [3]), placements.SERVER))
    assert again[0] is first[0] and len(calls) == 1
    other_type = computation_types.FederatedType(T(np.float32, [None]), placements.SERVER)
    other = shared.serialize(state, other_type)
    assert len(calls) == 2 and other[1] == other_type and other[0] == _tff_bytes(state, other_type)


def test_a_groups_ids_go_as_one_dataset_and_arrive_as_they_were(monkeypatch):
    # TFF's own path converts each id to a tensor on its own (`make_data_set_from_elements`).
    made = []
    make = tensorflow_utils.make_data_set_from_elements
    monkeypatch.setattr(tensorflow_utils, "make_data_set_from_elements", lambda *a: made.append(a) or make(*a))
    ids = [["f0001_03", "f0002_11"], ["f0003_07"], []]
    ids_type = computation_types.FederatedType(computation_types.SequenceType(np.str_), placements.CLIENTS)
    sent = executor_pb2.Value.FromString(_tffpipe_bytes(ids, ids_type))
    assert len(made) == 1  # only the empty group took TFF's path
    received, received_type = value_serialization.deserialize_value(sent, ids_type)
    assert [[x.decode() for x in d.as_numpy_iterator()] for d in received] == ids
    assert received_type == ids_type


def _reads_as_tff(data: bytes, type_hint) -> tuple[object, object]:
    """tffpipe's reading of `data` (an `executor_pb2.Value`), checked against TFF's: value and type, or error."""
    try:
        expected = value_serialization.deserialize_value(executor_pb2.Value.FromString(data), type_hint)
    except Exception as e:  # noqa: BLE001  (then tffpipe must raise the same)
        with pytest.raises(type(e)) as raised:
            serialization.deserialize_value(data, type_hint)
        assert str(raised.value) == str(e)
        return None, None
    got = serialization.deserialize_value(data, type_hint)
    conftest.same_value(got[0], expected[0])
    assert got[1] == expected[1]
    return got


def _read_both_ways(value, type_spec) -> None:
    data = _tff_bytes(value, type_spec)
    _reads_as_tff(data, type_spec)
    _reads_as_tff(data, None)  # no hint: the types come from the bytes


@pytest.mark.parametrize("name", STATES)
def test_a_states_bytes_and_a_rounds_argument_read_back_as_tff_reads_them(next_arguments, name):
    state, ids, (state_type, ids_type) = next_arguments[name]
    _read_both_ways(state, state_type)
    if not isinstance(ids_type.member, computation_types.SequenceType):
        _read_both_ways(ids, ids_type)
    else:  # a group's ids: datasets, left to TFF's deserializer
        _reads_as_tff(_tffpipe_bytes(ids, ids_type), ids_type)


@pytest.mark.parametrize("name", EDGES)
def test_edge_cases_read_back_as_tff_reads_them(name):
    _read_both_ways(*EDGES[name])


def test_arrays_are_read_in_place_and_the_rest_by_tff(monkeypatch):
    # A worker's partial aggregate: a server value of arrays, a count, a scalar. A large array is
    # a view of the bytes received (no copy), a small one a copy (it would hold all the bytes),
    # both read-only and read without TFF; the scalars go to TFF.
    left_to_tff = []
    deserialize = value_serialization.deserialize_value
    monkeypatch.setattr(
        value_serialization, "deserialize_value", lambda v, t=None: left_to_tff.append(t) or deserialize(v, t)
    )
    member = computation_types.StructType(
        [
            ("sum", T(np.float32, [2, 10_000])),
            ("n", T(np.int64)),
            ("means", computation_types.StructType([T(np.float64, [3])])),
        ]
    )
    value_type = computation_types.FederatedType(member, placements.SERVER)
    value = collections.OrderedDict(sum=np.ones((2, 10_000), np.float32), n=np.int64(7), means=[np.arange(3.0)])
    proto = value_serialization.serialize_value(value, value_type)[0]
    proto.federated.type.all_equal = False  # as the C++ worker returns it: all_equal comes from the type
    data = executor_pb2.ComputeResponse(value=proto).SerializeToString()
    _reads_as_tff(proto.SerializeToString(), value_type)
    expected = deserialize(proto, value_type)[0]
    left_to_tff.clear()
    got = serialization.deserialize_compute_response(data, value_type)
    conftest.same_value(got, expected)
    assert left_to_tff == [member["n"]]  # only the count
    received = np.frombuffer(data, np.uint8)
    assert np.shares_memory(got["sum"], received) and not got["sum"].flags.writeable
    assert not np.shares_memory(got["means"][0], received) and not got["means"][0].flags.writeable
    assert got["n"] == 7 and type(got["n"]) is np.int64
    # A response protobuf would merge (two values) is read by protobuf and TFF, as before.
    twice = data + executor_pb2.ComputeResponse(value=proto).SerializeToString()
    expected = value_serialization.deserialize_value(executor_pb2.ComputeResponse.FromString(twice).value, None)[0]
    conftest.same_value(serialization.deserialize_compute_response(twice, None), expected)


def _element(name: bytes, *values: bytes) -> bytes:
    """A struct's element with `name` (any bytes) and each of `values` (serialized `Value`s), on the wire."""
    fields = [(1, name)] + [(2, v) for v in values]
    return b"".join(serialization._varint(n << 3 | 2) + serialization._varint(len(b)) + b for n, b in fields)


def _struct_of(*elements: bytes) -> bytes:
    inner = b"".join(serialization._varint(1 << 3 | 2) + serialization._varint(len(e)) + e for e in elements)
    return serialization._varint(3 << 3 | 2) + serialization._varint(len(inner)) + inner


@pytest.mark.parametrize(
    "name, data",
    [
        ("nothing", b""),
        ("truncated", _tff_bytes(np.ones(4, np.float32), T(np.float32, [4]))[:-3]),
        (
            "a federated value without members",
            executor_pb2.Value(federated=executor_pb2.Value.Federated()).SerializeToString(),
        ),
        (
            "a struct element without a value",
            executor_pb2.Value(
                struct=executor_pb2.Value.Struct(element=[executor_pb2.Value.Struct.Element(name="a")])
            ).SerializeToString(),
        ),
        (
            "an array without content",
            executor_pb2.Value(array=array_pb2.Array(dtype=data_type_pb2.DT_FLOAT)).SerializeToString(),
        ),
        (
            "an element with two values (protobuf merges them)",
            _struct_of(
                _element(
                    b"a",
                    _tff_bytes(np.ones(4, np.float32), T(np.float32, [4])),
                    _tff_bytes(np.zeros(4, np.float32), T(np.float32, [4])),
                )
            ),
        ),
        (
            "a name that is not UTF-8",
            _struct_of(_element(b"\xff", _tff_bytes(np.ones(4, np.float32), T(np.float32, [4])))),
        ),
    ],
)
def test_malformed_values_read_as_tff_reads_them(name, data):
    # TFF's value or error, whichever it gives, with or without a hint.
    _reads_as_tff(data, None)
    _reads_as_tff(data, T(np.float32, [4]) if not name.startswith(("an element", "a name")) else None)
    if name.startswith(("an element", "a name")):
        _reads_as_tff(data, computation_types.StructType([("a", T(np.float32, [4]))]))
