"""The local TFF worker: a real FedAvg round, loopback-only, and no survivors."""

import collections
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.framework import ops as tf_ops
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from tests import conftest
from tffpipe import accounting, algorithms, audit, configs, runtime, serialization


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    found.add(cols[1].split(":")[0])
    return found


def test_one_real_fedavg_round_on_two_tiny_clients_changes_the_weights(tff_context):
    def model_fn():
        keras_model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])
        return tff.learning.models.from_keras_model(
            keras_model,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=collections.OrderedDict(
                x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None, 1], tf.int32)
            ),
        )

    def client(label: int) -> tf.data.Dataset:
        x = np.full((4, 3), float(label), np.float32)
        y = np.full((4, 1), label, np.int32)
        return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(2)

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.5)
    )
    state = process.initialize()
    before = process.get_model_weights(state).trainable
    output = process.next(state, [client(0), client(1)])
    after = process.get_model_weights(output.state).trainable
    assert output.metrics["client_work"]["train"]["num_examples"] == 8
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))
    assert tff_context.pid is not None


class _FakeExecutor:
    def __init__(self, clients: int):
        self.clients, self.closed = clients, False

    def close(self):
        self.closed = True


def test_executors_of_cohort_sizes_no_longer_used_are_closed():
    # TFF's factory drops old executors without closing them, so the worker keeps every
    # executor stack it ever built: one per cohort size, which Poisson sampling changes each round.
    made = []
    factory = runtime.ExecutorPerCohortSize(
        lambda c: made.append(_FakeExecutor(c.get("clients", 0))) or made[-1], kept=2
    )
    five = factory.create_executor({"clients": 5})
    seven = factory.create_executor({"clients": 7})
    assert factory.create_executor({"clients": 5}) is five  # reused, now the most recent
    nine = factory.create_executor({"clients": 9})
    assert seven.closed and not five.closed and not nine.closed
    assert [e.clients for e in made] == [5, 7, 9]
    factory.clean_up_executor({"clients": 9})
    assert nine.closed
    # Computations without clients (initialize, get/set_model_weights) run beside them without
    # pushing a cohort size out: their executor is kept apart, made once, closed with the rest.
    server = factory.create_executor({"clients": 0})
    eleven = factory.create_executor({"clients": 11})
    assert factory.create_executor({"clients": 0}) is server and factory.create_executor({}) is not server
    assert factory.create_executor({"clients": 5}) is five and not five.closed and not eleven.closed
    factory.close()
    assert all(e.closed for e in made)
    with pytest.raises(ValueError, match="kept must be at least 1"):
        runtime.ExecutorPerCohortSize(lambda c: None, kept=0)


def test_a_computation_goes_to_a_workers_executor_once_while_that_executor_lives(tff_context, monkeypatch):
    # TFF sent the computation with every invocation (W1's up_to_merge: 347 KB, each worker, each round).
    sent = []
    create = runtime._Stub.create_value_serialized

    def recording(stub, request):
        sent.append(executor_pb2.CreateValueRequest.FromString(request).value.WhichOneof("value"))
        return create(stub, request)

    monkeypatch.setattr(runtime._Stub, "create_value_serialized", recording)

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(x):
        return tff.federated_sum(x)

    def call(n: int) -> list[str]:
        sent.clear()
        assert total([1.0] * n) == n
        return sent.count("computation")

    assert call(2) == 1  # a new computation for this executor
    assert [call(2), call(2)] == [0, 0]  # kept on the worker's executor
    assert call(3) == 1  # another cohort size: another executor
    assert call(2) == 0  # two executors are kept: this one still holds it
    call(4), call(5)  # push the executor of 2 clients out (closed on the worker)
    assert call(2) == 1  # a new executor: sent again

    # The 8 most recently used are kept: a ninth pushes the oldest out (its value disposed of).
    def scaled(k: float):
        @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
        def scaled_sum(x):
            return tff.federated_map(tff.tensorflow.computation(lambda v: v * k, np.float32), tff.federated_sum(x))

        return scaled_sum

    others = [scaled(float(k)) for k in range(1, 9)]
    for comp in others:
        sent.clear()
        assert comp([1.0, 2.0]) == 3.0 * float(others.index(comp) + 1) and sent.count("computation") == 1
    assert call(2) == 1  # total was the oldest of nine
    sent.clear()
    others[-1]([1.0, 2.0])
    assert sent.count("computation") == 0


_NOBODY_PYTHON = "/usr/bin/python3"  # the venv's interpreter may sit where `nobody` cannot enter


def _connect_as_nobody(path: str) -> str:
    """Tries to connect to the Unix socket `path` as user `nobody`; returns 'connected' or the error's name."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1]); print('connected')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", _NOBODY_PYTHON, "-I", "-c", script, path]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run the attempt as another user (nobody)")
@pytest.mark.skipif(not os.path.isfile(_NOBODY_PYTHON), reason=f"{_NOBODY_PYTHON} is needed to run as nobody")
def test_a_run_s_own_worker_has_no_tcp_port_and_another_user_cannot_connect(tff_context):
    # The worker `train` starts listens on a Unix socket in a 0700 directory: nothing on
    # the network, and the kernel refuses other local users at connect().
    tff_context.start()
    assert _listening_addresses(tff_context.pid) == set()
    path = tff_context.target.removeprefix("unix:")
    directory = os.stat(os.path.dirname(path))
    assert (directory.st_mode & 0o777, directory.st_uid) == (0o700, os.geteuid())
    assert _connect_as_nobody(path) == "PermissionError"
    # The same attempt reaches a socket whose directory others may enter: the refusal above
    # comes from the directory's permissions, not from a failed attempt.
    open_dir = tempfile.mkdtemp(dir="/tmp")
    os.chmod(open_dir, 0o755)
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(os.path.join(open_dir, "s.sock"))
        os.chmod(os.path.join(open_dir, "s.sock"), 0o777)
        listener.listen()
        assert _connect_as_nobody(os.path.join(open_dir, "s.sock")) == "connected"
    finally:
        listener.close()
        shutil.rmtree(open_dir)
    # And this user still reaches the worker through the socket.
    assert tff_context.stub().is_ready


def test_a_worker_listens_on_the_address_it_is_given():
    worker = runtime.LocalWorker(bind_address="::1")
    try:
        worker.start()
        assert _listening_addresses(worker.pid) == {"00000000000000000000000001000000"}  # ::1
    finally:
        worker.stop()


def test_an_ipv4_address_given_as_ipv4_mapped_ipv6_listens_on_that_ipv4_address_only():
    # /proc/net/tcp writes 127.0.0.1 as 0100007F; tcp6 writes ::ffff:127.0.0.1 with the last word 0100007F.
    worker = runtime.LocalWorker(bind_address="::ffff:127.0.0.1")
    try:
        worker.start()
        assert _listening_addresses(worker.pid) <= {"0100007F", "0000000000000000FFFF00000100007F"}
        assert _listening_addresses(worker.pid)
    finally:
        worker.stop()


def test_a_pinned_worker_runs_on_its_cpu_and_socket_directories_go_with_their_runs():
    # A run killed with SIGKILL leaves its socket directory; the next worker started removes
    # those of dead runs (the pid is in the name) and keeps those of live ones.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tempfile.mkdtemp(prefix=f"tffpipe-worker-{dead.pid}-")
    live = tempfile.mkdtemp(prefix=f"tffpipe-worker-{os.getpid()}-")
    worker = runtime.LocalWorker(cpus=[0])
    try:
        worker.start()
        with open(f"/proc/{worker.pid}/status") as f:
            allowed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
        assert allowed == "0"
        directory = os.path.dirname(worker.target.removeprefix("unix:"))
        assert os.path.isdir(directory)
        assert not os.path.exists(stale) and os.path.isdir(live)
    finally:
        worker.stop()
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    assert not os.path.exists(directory)


def _round(task, process, state, ids):
    output = process.next(state, ids)
    return [np.asarray(w) for w in output.state.global_model_weights.trainable], output


def test_two_workers_compute_what_one_computes(tiny_data_dir):
    # One round of DP FedAvg (fixed clipping, no noise) over 6 clients: one worker, then two,
    # each taking 3 clients, whose partial sums TFF's mergeable context adds here.
    task = conftest.emnist_task(tiny_data_dir, "linear")
    factory = conftest.dp_factory(configs.Mechanism.FIXED, 0.0, 6, clip=1.0)
    process = task.compose_train(
        algorithms.build_training_process(task.learning_model(), configs.AlgorithmConfig(), aggregator=factory)
    )
    context = context_stack_impl.context_stack.current
    ids = task.train_data.client_ids[:6]
    results = []
    for count in (1, 2):
        workers = runtime.create(local_workers=count).start()
        try:
            state = process.initialize()
            results.append(_round(task, process, state, ids))
        finally:
            workers.stop()
            context_stack_impl.context_stack.set_default_context(context)
    (one, one_out), (two, two_out) = results
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(one, two, strict=True)) < 1e-6
    assert (
        one_out.metrics["client_work"]["train"]["num_examples"]
        == two_out.metrics["client_work"]["train"]["num_examples"]
    )


def test_a_dead_remote_worker_fails_its_call_instead_of_being_waited_for_forever():
    worker = runtime.LocalWorker(bind_address="127.0.0.1")
    worker.start()
    remote = runtime.RemoteWorker(f"127.0.0.1:{worker.port}")
    remote.start()
    workers = runtime.Runtime([remote], retries=0)
    context = context_stack_impl.context_stack.current
    try:
        workers.start()

        @tff.tensorflow.computation
        def one():
            return tf.constant(1)

        assert workers.call(one) == 1
        worker.stop()  # the service goes away; TFF alone would retry it forever
        began = time.monotonic()
        with pytest.raises(runtime.WorkerFault, match=f"worker 127.0.0.1:{worker.port} stopped during a round"):
            workers.call(one)
        assert time.monotonic() - began < 30
    finally:
        workers.stop()
        worker.stop()
        context_stack_impl.context_stack.set_default_context(context)


class _Link:
    """A TCP forward from a loopback port to a worker; `cut()` makes it a link that died silently.

    After the cut nothing passes either way and nothing is closed, and new connections are
    accepted but never answered: an SSH forward whose far side is gone (its local port still
    accepts), or a cable pulled (no reset reaches this side).
    """

    def __init__(self, port: int):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = port
        self._cut = threading.Event()
        self._sockets = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(near)
            if self._cut.is_set():
                continue
            far = socket.create_connection(("127.0.0.1", self._target))
            self._sockets.append(far)
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket):
        while True:
            try:
                data = a.recv(1 << 16)
                if not data:
                    return
                if not self._cut.is_set():
                    b.sendall(data)
            except OSError:
                return

    def cut(self):
        self._cut.set()

    def close(self):
        for s in self._sockets:
            s.close()


def test_a_remote_worker_whose_link_dies_silently_is_dropped_instead_of_waited_for():
    worker = runtime.LocalWorker(bind_address="127.0.0.1")
    worker.start()
    link = _Link(worker.port)
    remote = runtime.RemoteWorker(f"127.0.0.1:{link.port}", probe_interval=0.5, probe_timeout=2.0)
    workers = runtime.Runtime([remote], retries=0)
    context = context_stack_impl.context_stack.current
    calls = concurrent.futures.ThreadPoolExecutor(1)
    try:
        workers.start()

        @tff.tensorflow.computation
        def one():
            return tf.constant(1)

        assert workers.call(one) == 1
        link.cut()  # its port still accepts connections: only the gRPC handshake tells
        installed = context_stack_impl.context_stack.current  # TFF's context stack is per thread

        def call_one():
            with context_stack_impl.context_stack.install(installed):
                return workers.call(one)

        began = time.monotonic()
        call = calls.submit(call_one)
        with pytest.raises(runtime.WorkerFault, match=f"worker 127.0.0.1:{link.port} stopped during a round"):
            call.result(timeout=30)
        # Found within the first probe: 0.5 s waiting, then 2 s for a handshake that never comes.
        assert time.monotonic() - began < 10
    finally:
        link.close()  # ends a call still waiting (after a failure above)
        calls.shutdown(wait=True)
        workers.stop()
        worker.stop()
        context_stack_impl.context_stack.set_default_context(context)


def test_the_data_check_leaves_no_executor_on_the_workers(monkeypatch):
    # Each check opens an executor on the worker; left open, the worker would keep its
    # stack for the whole run. Every executor the check obtains must be disposed of.
    opened, disposed = [], []
    get_executor, dispose_executor = runtime._Stub.get_executor, runtime._Stub.dispose_executor

    def recording_get_executor(self, request):
        response = get_executor(self, request)
        opened.append(response.executor.id)
        return response

    def recording_dispose_executor(self, request):
        disposed.append(request.executor.id)
        return dispose_executor(self, request)

    monkeypatch.setattr(runtime._Stub, "get_executor", recording_get_executor)
    monkeypatch.setattr(runtime._Stub, "dispose_executor", recording_dispose_executor)

    @tff.tensorflow.computation
    def fingerprint():
        return tf.constant(5, tf.int64), tf.constant(8, tf.int64)

    services = [runtime.LocalWorker(bind_address="127.0.0.1") for _ in range(2)]
    workers = runtime.Runtime([])
    try:
        for service in services:
            service.start()
        workers.workers = [runtime.RemoteWorker(f"127.0.0.1:{s.port}") for s in services]
        workers.check_data(fingerprint, (5, 8), "/data")
        assert len(opened) == 2  # one executor per worker
        assert sorted(disposed) == sorted(opened)
    finally:
        workers.stop()
        for service in services:
            service.stop()


def test_starting_workers_while_grpc_is_live_runs_no_python_between_fork_and_exec():
    # gRPC warns when a process forks with its threads live and a Python `preexec_fn` runs in
    # the child (that path hung a run with 10 local workers). Workers are started without one;
    # the control shows the warning is what a preexec_fn child would print here.
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        from tffpipe import runtime
        workers = [runtime.LocalWorker() for _ in range(3)]
        for w in workers:
            w.start()  # each leaves a gRPC channel, and its threads, live here
        if sys.argv[1] == "control":
            subprocess.run(["true"], preexec_fn=lambda: None, check=True)
        for w in workers:
            w.stop()
        """
    )
    outputs = {
        mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        for mode in ("workers", "control")
    }
    assert all(proc.returncode == 0 for proc in outputs.values()), outputs
    assert "fork" not in outputs["workers"].stderr
    assert "skipping fork() handlers" in outputs["control"].stderr


def test_worker_dies_when_its_parent_is_killed_with_sigkill():
    script = textwrap.dedent(
        """
        import os, sys, time
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        from tffpipe import algorithms, configs, runtime
        worker = runtime.install_local_context()
        worker.stub()
        print(worker.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    assert worker_pid in conftest.worker_pids()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while worker_pid in conftest.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pid not in conftest.worker_pids()


@pytest.fixture(scope="module")
def one_and_two_workers():
    """A runtime of one local worker and one of two, both kept running; `use(r)` installs r's context."""
    context = context_stack_impl.context_stack.current
    runtimes = runtime.create(local_workers=1), runtime.create(local_workers=2)
    try:
        yield runtimes
    finally:
        for r in runtimes:
            r.stop()
        context_stack_impl.context_stack.set_default_context(context)


# Each feature that reaches TFF's computations, over one worker and over two. The device
# model only chooses which sampled clients report (in Python, before `next`): the
# computation a round runs is one of these.
OVER_WORKERS = {
    "fixed clipping with noise": {"dp.mechanism": configs.Mechanism.FIXED, "dp.noise_multiplier": 0.5},
    # TF Privacy draws adaptive clipping's noise unseeded (`aggregation`): without noise, its clip
    # still adapts, through the clipped-count sum the workers' partial sums must merge into.
    "adaptive clipping": {"dp.mechanism": configs.Mechanism.ADAPTIVE, "dp.noise_multiplier": 0.0},
    "DP-FTRL tree": {"dp.mechanism": configs.Mechanism.TREE, "dp.noise_multiplier": 0.5, "loop.rounds": 2},
    "compression": {"dp.mechanism": configs.Mechanism.NONE, "compression": True},  # see COMPRESSION_STEP
    "fedprox": {"dp.mechanism": configs.Mechanism.NONE, "algorithm.algorithm": configs.Algorithm.FEDPROX},
    "fedsgd": {"dp.mechanism": configs.Mechanism.NONE, "algorithm.algorithm": configs.Algorithm.FEDSGD},
    "fedadam with canaries": {
        "dp.mechanism": configs.Mechanism.FIXED,
        "algorithm.algorithm": configs.Algorithm.FEDADAM,
        "privacy.canaries": 2,
    },
}


def _largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def _fedsgd_round(task, weights: list[np.ndarray], ids: list[str], learning_rate: float) -> list[np.ndarray]:
    """One FedSGD round computed in plain TensorFlow, without TFF's runtime.

    TFF's FedSGD sums each batch's gradient times its size, and weights clients by their
    examples: the round's gradient is that of the mean loss over all the clients'
    examples, which the server's SGD (no momentum) subtracts, scaled by the learning rate.
    """
    model = task.create_keras_model()
    model.set_weights(weights)
    batches = [b for cid in ids for b in task.train_data.create_tf_dataset_for_client(cid)]
    x, y = (tf.concat([b[k] for b in batches], 0) for k in ("x", "y"))
    with tf.GradientTape() as tape:
        loss = task.loss_fn()(y, model(x))
    gradients = tape.gradient(loss, model.trainable_weights)
    return [w - learning_rate * g.numpy() for w, g in zip(weights, gradients, strict=True)]


# TFF's compression rounds stochastically with unseeded randomness: two runs on ONE worker
# already differ by up to ~2.3e-4 here (one 8-bit step of these updates is ~1e-3).
COMPRESSION_STEP = 2e-3


@pytest.mark.parametrize("values", OVER_WORKERS.values(), ids=OVER_WORKERS.keys())
def test_every_algorithm_and_aggregator_gives_over_two_workers_what_one_gives(
    values, one_and_two_workers, tiny_data_dir, monkeypatch
):
    # Every result a worker returns (partial aggregates, after_merge's, one worker's) is read in
    # place; here each is also read by TFF's deserializer, and the two must be equal.
    from tensorflow_federated.python.core.impl.executors import value_serialization

    read, compared = serialization.deserialize_compute_response, []

    def read_both_ways(data, type_hint):
        got = read(data, type_hint)
        response = executor_pb2.ComputeResponse.FromString(data)
        conftest.same_value(got, value_serialization.deserialize_value(response.value, type_hint)[0])
        compared.append(type_hint)
        return got

    monkeypatch.setattr(serialization, "deserialize_compute_response", read_both_ways)
    config = configs.build({"model": "linear", "clients_per_round": 6, "seed": 3, **values})
    task = conftest.emnist_task(tiny_data_dir, "linear")
    plan = accounting.create_plan(config, population=len(task.train_data.client_ids))
    process = algorithms.build_learning_process(task, config, plan)
    ids = task.train_data.client_ids[:6] + audit.canary_ids(config.privacy.canaries)
    results = []
    for workers in one_and_two_workers:
        workers.start()
        state = process.initialize()
        initial = audit.trainable_weights(state)
        for _ in range(2):  # the second round reads state the first one wrote (tree, adaptive clip, Adam)
            weights, output = _round(task, process, state, ids)
            state = output.state
        results.append((weights, output.metrics))
    (one, one_metrics), (two, two_metrics) = results
    assert len(compared) >= 6  # each round's results over one and over two workers were compared
    tolerance = COMPRESSION_STEP if config.compression else 1e-5
    assert _largest_difference(one, two) < tolerance
    # Both moved the model, by far more than they may differ: two rounds that change nothing fail here.
    assert _largest_difference(one, initial) > 10 * tolerance
    if config.algorithm.algorithm is configs.Algorithm.FEDSGD:
        expected = initial
        for _ in range(2):
            expected = _fedsgd_round(task, expected, ids, config.algorithm.server_learning_rate)
        assert _largest_difference(one, expected) < 1e-5
    flat_one, flat_two = tff.structure.flatten(one_metrics), tff.structure.flatten(two_metrics)
    rtol = 1e-3 if config.compression else 1e-4
    np.testing.assert_allclose(np.asarray(flat_one, np.float64), np.asarray(flat_two, np.float64), rtol=rtol, atol=1e-5)


def _random_value(type_spec, rng):
    """A value of `type_spec` (structs and tensors; an unknown dimension is 3), every float exponent."""
    if isinstance(type_spec, tff.StructType):
        return tff.structure.Struct([(n, _random_value(t, rng)) for n, t in tff.structure.iter_elements(type_spec)])
    shape = [3 if d is None else d for d in type_spec.shape]
    dtype = np.dtype(type_spec.dtype.type)
    if dtype.kind == "f":
        value = (rng.standard_normal(shape) * 10.0 ** rng.integers(-20, 20, shape)).astype(dtype)
    else:
        value = rng.integers(0, 1000, shape).astype(dtype)
    return value if shape else value[()]


@pytest.mark.parametrize("values", OVER_WORKERS.values(), ids=OVER_WORKERS.keys())
def test_each_algorithms_merge_folds_in_numpy_to_tensorflows_bits(values, tiny_data_dir, tff_context):
    # Two workers make one merge; from three on the fold adds into its own accumulator: every
    # algorithm's and aggregator's merge, folded over four partial aggregates, as TensorFlow folds them.
    config = configs.build({"model": "linear", "clients_per_round": 6, "seed": 3, **values})
    task = conftest.emnist_task(tiny_data_dir, "linear")
    process = algorithms.build_learning_process(task, config, accounting.create_plan(config, population=100))
    merge = runtime._compile_with_local_merge(process.next).merge
    assert isinstance(merge, runtime._LocalMerge)
    in_tensorflow = runtime._LocalMerge.of(merge._merge, numpy=False)
    rng = np.random.default_rng(11)
    partials = [_random_value(merge.type_signature.result, rng) for _ in range(4)]
    got = expected = partials[0]
    arrays_made = []
    for p in partials[1:]:
        got = merge.run(tff.structure.Struct.unnamed(got, p))
        expected = in_tensorflow.run(tff.structure.Struct.unnamed(expected, p))
        arrays_made.append([a for a in tff.structure.flatten(got) if isinstance(a, np.ndarray)])
    for g, e in zip(tff.structure.flatten(got), tff.structure.flatten(expected), strict=True):
        assert type(g) is type(e) and np.asarray(g).tobytes() == np.asarray(e).tobytes()
    assert any(a is b for a in arrays_made[1] for b in arrays_made[2])  # the third merge added into the second's


def test_federated_evaluation_over_two_workers_gives_what_one_gives(one_and_two_workers, tiny_data_dir):
    task = conftest.emnist_task(tiny_data_dir, "linear")
    process = task.compose_eval(algorithms.build_evaluation_process(task.learning_model()))
    ids = sorted(task.test_data.client_ids)[:6]
    found = []
    for workers in one_and_two_workers:
        workers.start()
        state = process.initialize()
        found.append(process.next(state, ids).metrics["client_work"]["eval"]["current_round_metrics"])
    assert found[0]["num_examples"] == found[1]["num_examples"] > 0
    assert float(found[0]["loss"]) == pytest.approx(float(found[1]["loss"]), rel=1e-5)


def test_two_workers_receive_the_state_serialized_once(one_and_two_workers, tiny_data_dir, monkeypatch):
    # The mergeable context sends each worker the same state; its bytes are made once a round.
    task = conftest.emnist_task(tiny_data_dir, "linear")
    process = task.compose_train(algorithms.build_training_process(task.learning_model(), configs.AlgorithmConfig()))
    state_type = str(process.next.type_signature.parameter[0])  # compiled, it has lost its Python containers
    serialized = []
    serialize = serialization.serialize_value
    monkeypatch.setattr(serialization, "serialize_value", lambda v, t: serialized.append(str(t)) or serialize(v, t))
    workers = one_and_two_workers[1]
    workers.start()
    state = process.initialize()
    serialized.clear()
    process.next(state, task.train_data.client_ids[:4])
    assert serialized.count(state_type) == 1  # two workers, 2 clients each
    process.next(state, task.train_data.client_ids[:4])
    assert serialized.count(state_type) == 2  # the next round makes it again (the cache lives one round)


def test_two_workers_partial_aggregates_are_merged_here_not_by_a_worker(
    one_and_two_workers, tiny_data_dir, monkeypatch
):
    # TFF's mergeable context asks a worker to merge each further partial aggregate. Here a
    # round of two workers is three worker calls (each runs up_to_merge, one runs
    # after_merge; TFF's fold would add a fourth, merge), and one merge runs here.
    task = conftest.emnist_task(tiny_data_dir, "linear")
    process = task.compose_train(algorithms.build_training_process(task.learning_model(), configs.AlgorithmConfig()))
    worker_calls, merges = [], []
    invoke, run = runtime._ThreadedContext.invoke, runtime._LocalMerge.run

    async def recording_invoke(self, comp, arg):
        if not isinstance(comp, runtime._LocalMerge):
            worker_calls.append(comp)
        return await invoke(self, comp, arg)

    monkeypatch.setattr(runtime._ThreadedContext, "invoke", recording_invoke)
    monkeypatch.setattr(runtime._LocalMerge, "run", lambda self, arg: merges.append(arg) or run(self, arg))
    workers = one_and_two_workers[1]
    workers.start()
    state = process.initialize()
    worker_calls.clear()
    merges.clear()
    output = process.next(state, task.train_data.client_ids[:4])
    assert (len(worker_calls), len(merges)) == (3, 1)
    # The merged sum counts each of the four clients' examples once (one local epoch).
    batches = [b for cid in task.train_data.client_ids[:4] for b in task.train_data.create_tf_dataset_for_client(cid)]
    assert output.metrics["client_work"]["train"]["num_examples"] == sum(int(b["y"].shape[0]) for b in batches)


def test_a_local_merge_adds_the_accumulators_without_formatting_them(monkeypatch):
    # A pruned graph has no structured signature: called as `pruned(*tensors)`, TF built a
    # TypeError holding every argument's numpy repr before its flat fallback, each merge.
    vector, count = tff.TensorType(np.float32, [1000]), tff.TensorType(np.int64)
    accumulator = tff.StructType([("sum", vector), ("n", count)])

    @tff.tensorflow.computation(accumulator, accumulator)
    def merge(a, b):
        return collections.OrderedDict(sum=a.sum + b.sum, n=a.n + b.n)

    local = runtime._LocalMerge.of(merge, numpy=False)  # the TensorFlow path (a sum goes to numpy otherwise)
    assert isinstance(local, runtime._LocalMerge)
    formatted = []  # tensors turned into text (an EagerTensor's repr goes through ops.value_text)
    value_text = tf_ops.value_text
    monkeypatch.setattr(tf_ops, "value_text", lambda t, is_repr=False: formatted.append(t) or value_text(t, is_repr))
    a = tff.structure.Struct([("sum", np.arange(1000, dtype=np.float32)), ("n", np.int64(3))])
    b = tff.structure.Struct([("sum", np.full(1000, 0.5, np.float32)), ("n", np.int64(4))])
    merged = local.run(tff.structure.Struct.unnamed(a, b))
    np.testing.assert_array_equal(merged.sum, np.arange(1000, dtype=np.float32) + 0.5)
    assert int(merged.n) == 7
    assert not formatted


def test_a_local_merge_of_sums_runs_in_numpy_with_tensorflows_bits_and_other_merges_in_tensorflow(monkeypatch):
    # The partial aggregates are numpy; converting each to an eager tensor and back cost more
    # than the sums. numpy must give TensorFlow's bits (float32, float64, int64, scalars, and
    # evaluation's per-client vectors, concatenated) and types (a numpy scalar for a scalar).
    accumulator = tff.StructType(
        [
            ("sum", tff.TensorType(np.float32, [1000])),
            ("n", tff.TensorType(np.int64)),
            ("total", tff.TensorType(np.float64, [3])),
            ("scalar", tff.TensorType(np.float32)),
            ("per_client", tff.TensorType(np.float32, [None])),
        ]
    )

    @tff.tensorflow.computation(accumulator, accumulator)
    def merge(a, b):
        return collections.OrderedDict(
            sum=a.sum + b.sum,
            n=a.n + b.n,
            total=a.total + b.total,
            scalar=a.scalar + b.scalar,
            per_client=tf.concat([a.per_client, b.per_client], 0),
        )

    @tff.tensorflow.computation(accumulator, accumulator)
    def other(a, b):  # not a sum: TensorFlow runs it
        return collections.OrderedDict(
            sum=a.sum * 0.5 + b.sum, n=a.n, total=a.total, scalar=a.scalar, per_client=b.per_client
        )

    rng = np.random.default_rng(5)

    def accumulator_value():
        scale = 10.0 ** rng.integers(-30, 30, 1000)  # every exponent: a rounding difference would show
        return tff.structure.Struct(
            [
                ("sum", (rng.standard_normal(1000) * scale).astype(np.float32)),
                ("n", np.int64(rng.integers(2**62))),
                ("total", np.array([1.5e308, -1.5e308, 1.0]) * rng.uniform(1.0, 1.1)),  # two of them overflow
                ("scalar", np.float32(rng.standard_normal())),
                ("per_client", rng.standard_normal(int(rng.integers(1, 5))).astype(np.float32)),
            ]
        )

    converted = []
    convert = tf.convert_to_tensor
    monkeypatch.setattr(tf, "convert_to_tensor", lambda *a, **k: converted.append(a) or convert(*a, **k))
    arg = tff.structure.Struct.unnamed(accumulator_value(), accumulator_value())
    in_numpy = runtime._LocalMerge.of(merge).run(arg)
    assert not converted  # numpy: nothing went through TensorFlow
    in_tensorflow = runtime._LocalMerge.of(merge, numpy=False).run(arg)
    assert converted
    for name in ("sum", "n", "total", "scalar", "per_client"):
        got, expected = in_numpy[name], in_tensorflow[name]
        assert type(got) is type(expected) and got.dtype == expected.dtype and got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name
    assert np.isinf(in_numpy.total[:2]).all()  # overflowed, as in TensorFlow: the bits compared cover it
    assert not any(np.shares_memory(in_numpy[name], arg[0][name]) for name in ("sum", "total", "per_client"))
    converted.clear()
    runtime._LocalMerge.of(other).run(arg)
    assert converted  # a multiplication is not added in numpy


def test_a_fold_of_local_merges_adds_into_its_own_accumulator_and_never_into_a_workers_value():
    # merge(merge(p1, p2), p3): the second merge's first input is the array the first one made,
    # and nothing else holds it; the sum goes into it (the same bits as TensorFlow's fold). The
    # workers' partials (read-only views of received bytes, or arrays TFF or a caller holds)
    # are never written, nor an accumulator the graph reads twice.
    accumulator = tff.StructType([("sum", tff.TensorType(np.float32, [1000])), ("n", tff.TensorType(np.int64))])

    @tff.tensorflow.computation(accumulator, accumulator)
    def merge(a, b):
        return collections.OrderedDict(sum=a.sum + b.sum, n=a.n + b.n)

    @tff.tensorflow.computation(accumulator, accumulator)
    def merge_and_keep(a, b):  # reads a.sum twice: the sum may not go into it
        return collections.OrderedDict(sum=a.sum + b.sum, n=a.n + b.n), a.sum

    rng = np.random.default_rng(7)
    partials = [
        tff.structure.Struct(
            [
                ("sum", (rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)),
                ("n", np.int64(i)),
            ]
        )
        for i in range(4)
    ]
    partials[1].sum.setflags(write=False)  # as a view of the bytes a worker sent
    before = [p.sum.copy() for p in partials]
    local, in_tensorflow = runtime._LocalMerge.of(merge), runtime._LocalMerge.of(merge, numpy=False)
    folded, expected = partials[0], partials[0]
    made = []
    for p in partials[1:]:
        folded = local.run(tff.structure.Struct.unnamed(folded, p))
        expected = in_tensorflow.run(tff.structure.Struct.unnamed(expected, p))
        made.append(folded.sum)
        assert folded.sum.tobytes() == expected.sum.tobytes() and folded.n == expected.n
    assert made[1] is made[0] and made[2] is made[0]  # one array, added into
    assert all(p.sum.tobytes() == b.tobytes() for p, b in zip(partials, before, strict=True))
    kept = runtime._LocalMerge.of(merge_and_keep)
    first = kept.run(tff.structure.Struct.unnamed(partials[0], partials[1]))[0]
    snapshot = first.sum.copy()
    second, held = kept.run(tff.structure.Struct.unnamed(first, partials[2]))
    assert second.sum is not first.sum and first.sum.tobytes() == snapshot.tobytes()
    assert held.tobytes() == snapshot.tobytes()


def test_a_merge_returning_one_sum_twice_gives_two_arrays_and_its_fold_tensorflows_bits(monkeypatch):
    # TensorFlow returns an array per output; two outputs of one sum must not come back as one
    # object, or the next merge, adding into one of them, would change the other before reading it.
    t = tff.TensorType(np.float32, [1000])
    accumulator = tff.StructType([("x", t), ("y", t), ("z", t)])

    @tff.tensorflow.computation(accumulator, accumulator)
    def merge(a, b):
        total = a.x + b.x
        return collections.OrderedDict(x=total, y=total, z=a.y + b.y)

    @tff.tensorflow.computation(accumulator, accumulator)
    def chained(a, b):  # a sum of sums: TensorFlow's optimizer may round it otherwise; it stays in TensorFlow
        return collections.OrderedDict(x=(a.x + b.x) + a.y, y=a.y, z=a.z)

    rng = np.random.default_rng(3)
    partials = [
        tff.structure.Struct([(n, rng.standard_normal(1000).astype(np.float32)) for n in "xyz"]) for _ in range(3)
    ]
    converted = []
    convert = tf.convert_to_tensor
    monkeypatch.setattr(tf, "convert_to_tensor", lambda *a, **k: converted.append(a) or convert(*a, **k))
    local, in_tensorflow = runtime._LocalMerge.of(merge), runtime._LocalMerge.of(merge, numpy=False)
    first = local.run(tff.structure.Struct.unnamed(partials[0], partials[1]))
    assert first.x is not first.y and not converted
    got = local.run(tff.structure.Struct.unnamed(first, partials[2]))
    expected = in_tensorflow.run(
        tff.structure.Struct.unnamed(
            in_tensorflow.run(tff.structure.Struct.unnamed(partials[0], partials[1])), partials[2]
        )
    )
    assert all(got[n].tobytes() == expected[n].tobytes() for n in "xyz")
    converted.clear()
    runtime._LocalMerge.of(chained).run(tff.structure.Struct.unnamed(partials[0], partials[1]))
    assert converted


def test_a_computation_is_compiled_once_and_hashed_only_when_first_seen(monkeypatch):
    # TFF's compile cache hashed the computation, i.e. serialized its whole proto, at every
    # invocation; an equal new object must still reuse the compiled result, as TFF's did.
    from tensorflow_federated.python.core.impl.computation import computation_impl

    @tff.tensorflow.computation(tff.TensorType(np.float32, [3]))
    def double(x):
        return x * 2

    hashed = []
    hash_of = computation_impl.ConcreteComputation.__hash__
    monkeypatch.setattr(computation_impl.ConcreteComputation, "__hash__", lambda c: hashed.append(c) or hash_of(c))
    compiled = []
    once = runtime._CompileOnce(lambda comp: compiled.append(comp) or object())
    first = once(double)
    assert once.compile(double) is first and once(double) is first
    assert len(compiled) == 1 and len(hashed) == 1  # later calls with the same object hash nothing
    twin = computation_impl.ConcreteComputation.from_building_block(double.to_building_block())
    assert twin is not double and twin == double
    assert once(twin) is first and len(compiled) == 1


def test_two_workers_compile_each_computation_once(one_and_two_workers, tiny_data_dir, monkeypatch):
    # Each worker's context compiled every computation for itself: at round 1 all at once,
    # and after_merge again on whichever worker first finished last in a later round.
    compiled = []
    compile_fn = runtime._CONTEXT_ARGS["compiler_fn"]
    monkeypatch.setitem(runtime._CONTEXT_ARGS, "compiler_fn", lambda comp: compiled.append(comp) or compile_fn(comp))
    task = conftest.emnist_task(tiny_data_dir, "linear")
    process = task.compose_train(algorithms.build_training_process(task.learning_model(), configs.AlgorithmConfig()))
    workers = one_and_two_workers[1]
    workers.start()  # installs a new context over the two workers
    state = process.initialize()
    for _ in range(3):
        state = process.next(state, task.train_data.client_ids[:4]).state
    # initialize's and next's up_to_merge and after_merge (merges run here): each once, not once per worker.
    assert len(compiled) == len(set(map(id, compiled))) == 4


def test_quiet_tracing_keeps_one_provider_so_a_span_opened_before_the_context_still_closes():
    # TFF's per-thread span stack holds one entry per tracing provider and asserts so on every span: a thread
    # that opened a span under TFF's one provider must still be able to open spans after tffpipe quiets tracing.
    from tensorflow_federated.python.common_libs import tracing

    before = tracing._global_tracing_providers
    try:
        with tracing.span("tffpipe_test", "before"):
            pass
        tracing.set_tracing_providers([tracing.LoggingTracingProvider()])
        with tracing.span("tffpipe_test", "tff_default"):
            pass
        runtime._quiet_tracing()
        assert len(tracing._global_tracing_providers) == 1
        with tracing.span("tffpipe_test", "after"):  # AssertionError in tracing.py with an empty provider list
            pass
    finally:
        tracing.set_tracing_providers(before)
