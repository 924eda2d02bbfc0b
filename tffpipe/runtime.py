"""Where computations run: TFF's C++ worker services, one or several, local or remote.

TFF 0.87 runs computations in `worker_binary` processes behind its `RemoteExecutor`.
Left as TFF starts it, that process (1) outlives Python after a `kill -9` or a crash,
(2) inherits stdout, so `python -m experiments.train | tail` never sees end-of-file,
and (3) serves gRPC on all interfaces without authentication. tffpipe starts the same
binary itself (`LocalWorker`, through `processes.spawn`): the kernel kills it when its
parent dies (PR_SET_PDEATHSIG), its output goes to a log file, and a preloaded shim
(`_native/loopback_bind.c`) rewrites its wildcard bind: to a Unix socket in a 0700
directory for a run's own workers (no other user, no other machine reaches them), or to
one chosen IP for `experiments.worker`. `RemoteWorker` reaches a worker started
elsewhere (`experiments.worker`).

One worker gets TFF's synchronous context, as before. Several get TFF's mergeable
context (`create_mergeable_comp_execution_context`): each round's computation is
compiled to mergeable form, the clients are split into one contiguous slice per
worker, every worker computes its slice's partial aggregate and the merge runs here.
TFF's async contexts over `RemoteExecutor` make blocking gRPC calls inside coroutines,
which would run the workers one after another; each worker's context therefore runs
on an event loop of its own thread (`_ThreadedContext`), so slices overlap. Values reach
a worker through `_RemoteExecutor`, TFF's with `serialization`'s in-place serializer; the
workers of a mergeable context share what one invocation serialized, so the server state
is serialized once a round instead of once per worker, and their partial aggregates are
merged here in TensorFlow (`_LocalMerge`) instead of by one remote call per worker (issue 22).

`Runtime` owns the workers and the installed context. A round is a pure function of
(state, sampled clients), so when a worker dies mid-round `Runtime.call` drops it,
installs a context over the workers left and runs the round again (at most
`retries` times, counted in `system/worker_retries`); a local worker is started
again instead. With none left it raises a `WorkerFault` naming the worker, and the
run keeps its last checkpoint. TFF itself would wait forever for a dead worker
(`_GuardedStub`), and so would gRPC for a remote worker whose link went down silently
(`_Watchdog` probes it while a call waits).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import IO, Any

import grpc
import numpy as np
import portpicker
import tensorflow as tf
import tensorflow_federated as tff
import tree
from absl import logging
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import async_utils, structure, tracing
from tensorflow_federated.python.core.backends.native import compiler, mergeable_comp_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.computation import computation_base, function_utils
from tensorflow_federated.python.core.impl.context_stack import context_base, context_stack_impl
from tensorflow_federated.python.core.impl.execution_contexts import (
    async_execution_context,
    mergeable_comp_execution_context,
    sync_execution_context,
)
from tensorflow_federated.python.core.impl.executors import (
    executor_factory,
    executors_errors,
    remote_executor,
    remote_executor_grpc_stub,
)
from tensorflow_federated.python.core.impl.types import computation_types, placements, type_analysis
from tensorflow_federated.python.core.impl.utils import tensorflow_utils
from tensorflow_federated.python.tensorflow_libs import serialization_utils

from tffpipe import errors, network, processes, serialization

_WORKER_BINARY = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")
_GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_CONTEXT_ARGS = dict(
    compiler_fn=compiler.desugar_and_transform_to_native,
    transform_args=tensorflow_computation.transform_args,
    transform_result=tensorflow_computation.transform_result,
)


class WorkerFault(errors.Fault):
    """A worker service is unreachable, serves other data, or stopped during the run."""


def _connect_address(bind_address: str) -> str:
    """Where to reach a worker bound to `bind_address` from this machine."""
    address = network.parse_ip(bind_address)
    if address.is_unspecified:
        return "127.0.0.1"
    return f"[{address}]" if address.version == 6 else str(address)


_SOCKET_DIR_PREFIX = "tffpipe-worker-"


def _remove_stale_socket_dirs() -> None:
    """Removes this user's socket directories whose run is gone (killed before it could clean up)."""
    for entry in os.scandir(tempfile.gettempdir()):
        if not entry.name.startswith(_SOCKET_DIR_PREFIX):
            continue
        pid = entry.name[len(_SOCKET_DIR_PREFIX) :].split("-", 1)[0]
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid() or not pid.isdigit():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


class LocalWorker:
    """One TFF C++ worker process on this machine, owned by this Python process.

    By default it listens on a Unix domain socket in a directory only this user can
    enter (0700, removed at `stop`): no other local user and no other machine can reach
    it (tests/runtime_test.py tries as `nobody`). With `bind_address` it listens on that
    IP and `port` instead, for `experiments.worker`, which serves other machines.

    Everything the child needs before it runs is set by the preloaded shim
    (`_native/loopback_bind.c`) from the environment, not by Python between fork and
    exec: the death signal (it dies with this process), the CPUs and the address.
    Python code there would run while gRPC's threads are live in this process, where a
    forked child can hang on a lock one of them held.

    Args:
      max_concurrent_computation_calls: clients the worker trains at once (-1: no limit).
      log_path: where its stdout and stderr go; discarded when None.
      bind_address: an IP to listen on, or None for a private Unix socket.
      port: its port with `bind_address`; None picks a free one.
      cpus: CPUs it may run on, None for all.
    """

    def __init__(
        self,
        *,
        max_concurrent_computation_calls: int = -1,
        log_path: str | None = None,
        bind_address: str | None = None,
        port: int | None = None,
        cpus: Sequence[int] | None = None,
    ):
        self._max_calls = max_concurrent_computation_calls
        self._log_path = log_path
        self._bind = bind_address
        self._port = port
        self._cpus = list(cpus) if cpus is not None else None
        self._process: subprocess.Popen | None = None
        self._stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub | None = None
        self._log_file: IO[bytes] | None = None
        self._socket_dir: str | None = None
        atexit.register(self.stop)

    @property
    def target(self) -> str | None:
        """Its gRPC target (`unix:/path` or `host:port`) while it runs."""
        if self._bind is None:
            return f"unix:{os.path.join(self._socket_dir, 'worker.sock')}" if self._socket_dir else None
        return f"{_connect_address(self._bind)}:{self._port}" if self._port else None

    @property
    def name(self) -> str:
        if self._bind is None:
            return f"local worker {self.target or '(private socket)'}"
        return f"local worker {_connect_address(self._bind)}:{self._port or '?'}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def port(self) -> int | None:
        return self._port

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the process (if it is not running) and waits until it serves."""
        self.stub()

    def stub(self) -> remote_executor_grpc_stub.RemoteExecutorGrpcStub:
        """Returns a ready stub, starting (or restarting) the worker when needed."""
        if self._stub is not None and self._stub.is_ready:
            return self._stub
        self.stop()
        env = dict(os.environ)
        # Clients run concurrently (one computation call each), which already fills the
        # cores; splitting each op over more threads on top only adds hand-offs. W2 rounds
        # 305/293 -> 260/242 ms, W1 unchanged (BENCHMARKS.md). A user's setting wins.
        env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        if self._bind is None:
            _remove_stale_socket_dirs()
            # 0700: this user only. The pid in the name lets a later run remove it after a kill -9.
            self._socket_dir = tempfile.mkdtemp(prefix=f"{_SOCKET_DIR_PREFIX}{os.getpid()}-")
            port = 1  # the shim replaces the socket: no port is bound
            env["TFFPIPE_BIND_ADDRESS"] = self.target
        else:
            port = self._port or portpicker.pick_unused_port()
            self._port = port
            env["TFFPIPE_BIND_ADDRESS"] = str(network.parse_ip(self._bind))
        out = subprocess.DEVNULL
        if self._log_path:
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115  (closed in stop())
            out = self._log_file
        self._process = processes.spawn(
            [_WORKER_BINARY, f"--port={port}", f"--max_concurrent_computation_calls={self._max_calls}"],
            stdout=out,
            env=env,
            cpus=self._cpus,
        )
        self._stub = _stub(self.target)
        deadline = time.monotonic() + 60
        while not self._stub.is_ready:
            if self._process.poll() is not None:
                raise WorkerFault(f"{self.name} exited at start with code {self._process.returncode}")
            if time.monotonic() > deadline:
                raise WorkerFault(f"{self.name} did not start serving within 60 s")
            time.sleep(0.05)
        return self._stub

    def stop(self) -> None:
        """Terminates the worker (if any) and waits for it; safe to call twice."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._stub = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


class WorkerUnusable(WorkerFault):
    """A `--workers` address that cannot serve this run, found before anything is written: bad input."""

    exit_code = 2


class RemoteWorker:
    """A worker service started elsewhere (`python -m experiments.worker`), at host:port.

    Its calls are watched (`_Watchdog`): a worker whose link goes down without a word is
    found gone within `probe_interval + probe_timeout` seconds, as a killed one is at once.
    `watched=False` leaves them unwatched (such a worker is then waited for as TFF waits):
    only to measure what watching costs (`benchmarks.workers --watchdog`).
    """

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = 10.0,
        probe_interval: float = 2.0,
        probe_timeout: float = 6.0,
        watched: bool = True,
    ):
        self.address = address
        self._endpoint = network.parse_endpoint(address)
        self._timeout = connect_timeout
        self._probe = (probe_interval, probe_timeout)
        self._watched = watched
        self._stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub | None = None
        self._channel: grpc.Channel | None = None
        self._watchdog: _Watchdog | None = None

    @property
    def name(self) -> str:
        return f"worker {self.address}"

    def alive(self) -> bool:
        """Connected, not given up by its watchdog, and a new connection to it still completes a gRPC handshake.

        Not the channel's state: over a link that went down silently the channel still reads
        READY, since nothing told TCP the connection is gone.
        """
        return self._watchdog is not None and not self._watchdog.gone and self._watchdog.reachable()

    def start(self) -> None:
        """Connects; a closed port fails at once, a service that is not gRPC within the timeout.

        Raises:
          WorkerUnusable: nothing listens there, or what listens is no gRPC service.
        """
        start_hint = (
            f"start it there with `python -m experiments.worker --port={self._endpoint.port}` (and the run's data "
            "flags), or check the address and any SSH forward"
        )
        try:
            socket.create_connection((self._endpoint.host, self._endpoint.port), timeout=self._timeout).close()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise WorkerUnusable(f"{self.name} is unreachable ({reason}): {start_hint}") from None
        self._channel = grpc.insecure_channel(str(self._endpoint), _GRPC_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self._timeout)
        except grpc.FutureTimeoutError:
            self.stop()
            raise WorkerUnusable(
                f"{self.name} accepts connections but does not answer as a gRPC service within {self._timeout:g} s "
                f"(is it a TFF worker?): {start_hint}"
            ) from None
        # A new watchdog per connection: the stubs of a closed one stay given up.
        self._watchdog = _Watchdog(self.name, self._endpoint, *self._probe)
        self._stub = _Stub(self._channel, watchdog=self._watchdog if self._watched else None)

    def stub(self) -> remote_executor_grpc_stub.RemoteExecutorGrpcStub:
        if self._stub is None:
            self.start()
        return self._stub

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.gone = True  # executors still holding its stub fail at once, free nothing
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = self._watchdog = None


def _stub(address: str) -> remote_executor_grpc_stub.RemoteExecutorGrpcStub:
    return _Stub(grpc.insecure_channel(address, _GRPC_OPTIONS))


class _Watchdog:
    """Ends a remote worker's gRPC calls with `WorkerLost` once its host stops answering.

    A worker whose link goes down silently (a cable, a switch, `ip link set <dev> down`)
    sends no reset: its TCP connection still looks open here, and a call waits for an answer
    for ever (nothing unacknowledged is in flight while the worker computes, so TCP has
    nothing to give up on; ~15 minutes of retransmissions if a request was being sent).
    TFF sets no deadline.
    gRPC keepalive is no cure here: TFF's worker binary keeps gRPC's server defaults, which
    allow a client's pings at most every 5 minutes while the server sends nothing (then
    GOAWAY "too_many_pings"), and a worker sends nothing while it trains: pings frequent
    enough to matter would end long rounds. Nor does a deadline drawn from past rounds tell
    a slow round from a dead link. So while a call is in flight, every `interval` seconds,
    the worker is probed on a new connection: TCP, then gRPC's HTTP/2 handshake, which the
    worker's kernel and gRPC's I/O threads answer whatever the worker is busy with. The
    handshake matters behind an SSH forward, whose local port accepts connections even
    when the link beyond it is dead. No answer within `timeout` (or a refusal) and the
    worker is `gone`: its calls then fail at once, and disposing of its values is a no-op
    (nothing is left to free on a host no longer reached, and TFF disposes from finalizers).
    """

    def __init__(self, name: str, endpoint: network.Endpoint, interval: float, timeout: float):
        self._name = name
        self._endpoint = endpoint
        self.interval = interval
        self.timeout = timeout
        self.gone = False

    def reachable(self) -> bool:
        try:
            socket.create_connection((self._endpoint.host, self._endpoint.port), timeout=self.timeout).close()
        except OSError:
            return False  # refused (the service is gone) or no answer (the link is)
        # A pool of its own: gRPC would otherwise hand this channel the run's connection,
        # which still reads READY over a dead link.
        channel = grpc.insecure_channel(str(self._endpoint), [("grpc.use_local_subchannel_pool", 1)])
        try:
            grpc.channel_ready_future(channel).result(timeout=self.timeout)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()

    def call(self, method: grpc.UnaryUnaryMultiCallable, request, *, disposal: bool = False):
        if self.gone:
            if disposal:
                return None
            raise WorkerLost(f"{self._name} is gone")
        future = method.future(request)
        while True:
            try:
                return future.result(timeout=self.interval)  # a failed call raises its grpc.RpcError
            except grpc.FutureTimeoutError:
                if self.gone or not self.reachable():
                    self.gone = True
                    future.cancel()
                    raise WorkerLost(
                        f"{self._name} stopped answering: a new connection to {self._endpoint} got no gRPC "
                        f"handshake within {self.timeout:g} s during a call"
                    ) from None


class _WatchedMethods:
    """A generated gRPC stub's methods, each called through a `_Watchdog`."""

    _DISPOSALS = ("Dispose", "DisposeExecutor")

    def __init__(self, stub, watchdog: _Watchdog):
        self._stub = stub
        self._watchdog = watchdog

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        return functools.partial(self._watchdog.call, method, disposal=name in self._DISPOSALS)


class _Stub(remote_executor_grpc_stub.RemoteExecutorGrpcStub):
    """TFF's stub, plus `CreateValue` from a request already serialized (`serialization.create_value_request`)
    and `Compute` whose response is left as bytes (`serialization.deserialize_compute_response`).

    With `watchdog` (remote workers), every call goes through it.
    """

    def __init__(self, channel: grpc.Channel, *, watchdog: _Watchdog | None = None):
        super().__init__(channel)
        self._create_value_serialized = channel.unary_unary(
            "/tensorflow_federated.v0.ExecutorGroup/CreateValue",
            request_serializer=None,  # the request is bytes
            response_deserializer=executor_pb2.CreateValueResponse.FromString,
        )
        self._compute_serialized = channel.unary_unary(
            "/tensorflow_federated.v0.ExecutorGroup/Compute",
            request_serializer=executor_pb2.ComputeRequest.SerializeToString,
            response_deserializer=None,  # the response stays bytes
        )
        if watchdog is not None:
            self._stub = _WatchedMethods(self._stub, watchdog)
            self._create_value_serialized = functools.partial(watchdog.call, self._create_value_serialized)
            self._compute_serialized = functools.partial(watchdog.call, self._compute_serialized)

    def create_value_serialized(self, request: bytes) -> executor_pb2.CreateValueResponse:
        return self._call(self._create_value_serialized, request)

    def compute_serialized(self, request: executor_pb2.ComputeRequest) -> bytes:
        """The serialized `executor_pb2.ComputeResponse`."""
        return self._call(self._compute_serialized, request)

    @staticmethod
    def _call(method, request):
        try:
            return method(request)
        except grpc.RpcError as e:  # as TFF's stub: "unavailable" and the like are for its retries
            if isinstance(e, grpc.Call) and e.code() in executors_errors.get_grpc_retryable_error_codes():
                raise executors_errors.RetryableGRPCError(e) from e
            raise


class WorkerLost(RuntimeError):  # noqa: N818  (TFF must not read it as retryable)
    """A worker's process is gone: its gRPC errors are final, not to be waited out."""


class _GuardedStub:
    """A worker's stub whose "unavailable" errors end the call once the worker is known dead.

    TFF's execution context retries an unavailable worker forever (exponential backoff
    up to 30 s per wait), so a round whose worker died would hang instead of failing.
    A transient error of a live worker is still retried as TFF does.
    """

    def __init__(self, stub, worker):
        self._stub = stub
        self._worker = worker

    def __getattr__(self, name: str):
        attribute = getattr(self._stub, name)
        if not callable(attribute):
            return attribute

        def guarded(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except executors_errors.RetryableError as e:
                if not self._worker.alive():
                    raise WorkerLost(f"{self._worker.name} is gone") from e
                raise

        return guarded


class ExecutorPerCohortSize(executor_factory.ExecutorFactory):
    """One executor per number of clients, as TFF's `ResourceManagingExecutorFactory`, but bounded.

    A worker builds an executor stack for each cardinality it is asked for, and keeps the
    TensorFlow functions it instantiates in it (about 150 MB for the keyboard LSTM). TFF's
    factory keeps ten in an LRU cache and drops the oldest without closing it, so the
    worker never frees one: under Poisson sampling nearly every round has a cohort size
    of its own, and a worker grew by 130 MB a round to 9.6 GB in 60 rounds of the
    keyboard DP preset. This keeps the `kept` most recently used and closes the others,
    which disposes of their stacks on the worker.

    Computations without clients (the state's initialization, `get_model_weights`,
    `set_model_weights`) get executors of their own, kept apart and never dropped: they
    hold a few small server-side functions, and counted with the rest they pushed out a
    cohort size still in use (training, then `get_model_weights` and evaluation, every
    evaluation round; a benchmark alternating per-client and grouped rounds rebuilt both
    executors every round: W2's per-client rounds took 0.82-0.86 s of CPU against 0.45-0.49).
    """

    def __init__(self, stack_fn: Callable[[dict], Any], kept: int = 2):
        if kept < 1:
            raise ValueError(f"kept must be at least 1 (the executor in use), got {kept}")
        self._stack_fn = stack_fn
        self._kept = kept
        self._executors: collections.OrderedDict = collections.OrderedDict()
        self._server_only: dict = {}

    @staticmethod
    def _key(cardinalities) -> tuple:
        return tuple(sorted((str(k), v) for k, v in cardinalities.items()))

    def create_executor(self, cardinalities):
        key = self._key(cardinalities)
        clients = sum(n for p, n in cardinalities.items() if getattr(p, "uri", p) == placements.CLIENTS.uri)
        if not clients:
            if key not in self._server_only:
                self._server_only[key] = self._stack_fn(cardinalities)
            return self._server_only[key]
        executor = self._executors.pop(key, None)
        if executor is None:
            executor = self._stack_fn(cardinalities)
        self._executors[key] = executor
        while len(self._executors) > self._kept:
            _, dropped = self._executors.popitem(last=False)
            dropped.close()
        return executor

    def clean_up_executor(self, cardinalities):
        key = self._key(cardinalities)
        executor = self._executors.pop(key, None) or self._server_only.pop(key, None)
        if executor is not None:
            executor.close()

    def close(self) -> None:
        """Closes every executor kept, which disposes of their stacks on the worker."""
        while self._executors or self._server_only:
            _, executor = (self._executors or self._server_only).popitem()
            with contextlib.suppress(WorkerLost):  # a worker that is gone keeps nothing
                executor.close()


class _RemoteExecutor(remote_executor.RemoteExecutor):
    """TFF's `RemoteExecutor`, with values serialized in place (`serialization`) and sent as bytes, and
    results read in place from the bytes received.

    With `shared`, a value all workers receive within one invocation (the server state) is
    serialized once for all of them; a computation is serialized once (`computations`, or
    the shared values' own).

    A computation is sent to the worker's executor once: TFF sent it at every invocation
    (W1's `up_to_merge`: 347 KB, to every worker, every round), and the worker parsed it
    again. Its value stays on the worker's executor, for the `functions_kept` most recently
    used, as long as the executor does (a new executor gets it again).
    """

    def __init__(
        self,
        stub,
        *,
        shared: serialization.SharedValues | None = None,
        computations: serialization.SerializedComputations | None = None,
        functions_kept: int = 8,
    ):
        super().__init__(stub)
        self._shared = shared
        self._computations = shared.computations if shared is not None else computations
        self._functions_kept = functions_kept
        # (id(computation), id(type)) -> (computation, type, executor id, its value on the worker)
        self._functions: collections.OrderedDict = collections.OrderedDict()

    async def create_value(self, value, type_spec=None):
        self._check_has_executor_id()
        function = serialization.is_computation(value)
        if function:
            key = (id(value), id(type_spec))
            found = self._functions.get(key)
            if found is not None and found[0] is value and found[1] is type_spec and found[2] == self._executor_id:
                self._functions.move_to_end(key)
                return found[3]
        if self._shared is not None:
            serialized, value_type = self._shared.serialize(value, type_spec)
        else:
            serialized, value_type = serialization.serialize_to_bytes(value, type_spec, self._computations)
        request = serialization.create_value_request(serialized, self._executor_id)
        response = self._stub.create_value_serialized(request)
        # A computation kept here is not disposed of at exit: its worker may be gone by then.
        result = remote_executor.RemoteValue(response.value_ref, value_type, self, dispose_at_exit=not function)
        if function:
            self._functions[key] = (value, type_spec, self._executor_id, result)
            while len(self._functions) > self._functions_kept:
                self._functions.popitem(last=False)  # its value is disposed of on the worker
        return result

    def close(self):
        try:
            super().close()  # the executor first: its values then go with it, not one by one
        finally:
            self._functions.clear()

    async def _compute(self, value_ref, type_spec):
        self._check_has_executor_id()
        request = executor_pb2.ComputeRequest(executor=self._executor_id, value_ref=value_ref)
        return serialization.deserialize_compute_response(self._stub.compute_serialized(request), type_spec)


def _executors(
    worker,
    shared: serialization.SharedValues | None = None,
    computations: serialization.SerializedComputations | None = None,
    kept: int = 2,
) -> ExecutorPerCohortSize:
    def stack_fn(cardinalities):
        cardinalities.setdefault(placements.CLIENTS, 0)
        executor = _RemoteExecutor(_GuardedStub(worker.stub(), worker), shared=shared, computations=computations)
        executor.set_cardinalities(cardinalities)
        return executor

    return ExecutorPerCohortSize(stack_fn, kept)


def _sync_context(
    executors: ExecutorPerCohortSize, compiler_fn: Callable[[Any], Any] | None = None
) -> sync_execution_context.SyncExecutionContext:
    """TFF's synchronous context over `executors`, compiling with `compiler_fn` (`_CompileOnce`; TFF's compiler
    by default)."""
    compile_once = compiler_fn if isinstance(compiler_fn, _CompileOnce) else None
    compile_once = compile_once or _CompileOnce(compiler_fn or _CONTEXT_ARGS["compiler_fn"])
    args = dict(_CONTEXT_ARGS, compiler_fn=compile_once)
    context = sync_execution_context.SyncExecutionContext(executor_fn=executors, **args)
    compile_once.install(context)
    return context


def _worker_context(
    executors: ExecutorPerCohortSize, compile_once: _CompileOnce
) -> async_execution_context.AsyncExecutionContext:
    """A worker's context in a mergeable context: TFF's async one, arguments and results taken as they are."""
    context = async_execution_context.AsyncExecutionContext(executor_fn=executors, compiler_fn=compile_once)
    compile_once.install(context)
    return context


class _CompileOnce:
    """`compiler_fn` shared by the workers' contexts: each computation compiled once, not once per worker.

    Each context keeps its own compile cache, so with W workers TFF compiled every
    computation W times: at round 1 concurrently (W times the coordinator's CPU while
    the workers wait), and `after_merge` again in whichever later round first makes a
    worker finish last. The compiled computation is also one object for all of them,
    so its serialized bytes are made once (`serialization.SerializedComputations`).
    Keeps the `kept` most recently compiled.

    Keyed on the computation object (held by its entry), not on its hash: TFF hashes a
    computation by serializing its whole proto, which its `CompilerPipeline` (an
    `lru_cache`) did at every invocation, in every worker's context (W1: the
    `up_to_merge` proto, each worker, each round). `install` puts it in that pipeline's place.
    A new object equal to one compiled before (TFF's equality) gets that one's result, as
    from TFF's cache: its hash is taken once, when it is first seen.
    """

    def __init__(self, compiler_fn: Callable[[Any], Any], kept: int = 32):
        self._compiler_fn = compiler_fn
        self._kept = kept
        self._lock = threading.Lock()
        # id(comp) -> (comp, slot): holding comp keeps its id its own. A slot: [lock, compiled or None].
        self._compiled: collections.OrderedDict = collections.OrderedDict()
        self._equal: dict[int, list] = {}  # TFF's hash -> [(comp, slot)], for new objects equal to one of them

    def __call__(self, comp):
        key = id(comp)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
        if found is None:
            try:
                digest = hash(comp)  # TFF serializes the computation's proto: once per object, outside the lock
            except TypeError:
                digest = None
            with self._lock:
                found = self._compiled.get(key)
                if found is None:
                    twins = self._equal.setdefault(digest, []) if digest is not None else []
                    slot = next((s for c, s in twins if c == comp), None) or [threading.Lock(), None]
                    found = self._compiled[key] = (comp, slot)
                    twins.append(found)
                    while len(self._compiled) > self._kept:
                        dropped = self._compiled.popitem(last=False)[1]
                        for twins in self._equal.values():
                            twins[:] = [t for t in twins if t is not dropped]  # by identity: no proto compared
        slot = found[1]
        with slot[0]:  # a second thread waits for the first one's result
            if slot[1] is None:
                slot[1] = self._compiler_fn(comp)
            return slot[1]

    compile = __call__  # TFF's `CompilerPipeline` interface

    def install(self, context) -> None:
        """Makes this `context`'s compiler (a TFF context with a `CompilerPipeline`), in place of TFF's pipeline."""
        target = getattr(context, "_async_context", context)
        if getattr(target, "_compiler_pipeline", None) is None:
            raise TypeError(f"{type(target).__name__} has no compiler pipeline to replace (TFF changed?)")
        target._compiler_pipeline = self  # noqa: SLF001


class _ThreadedContext(context_base.AsyncContext):
    """A worker's TFF async context, each invocation run on an event loop of its own thread.

    TFF's remote executor makes blocking gRPC calls inside its coroutines: on the
    mergeable context's loop they would run the workers one after another. Each worker's
    coroutines run on its own loop thread (`AsyncThreadRunner`, as TFF's synchronous
    context runs them), awaited from the mergeable context's loop: one thread hand-off
    per invocation (a synchronous context in `asyncio.to_thread` made two).
    """

    def __init__(self, context: async_execution_context.AsyncExecutionContext):
        self._context = context
        self._runner = async_utils.AsyncThreadRunner()

    async def invoke(self, comp, arg):
        if isinstance(comp, _LocalMerge):
            return comp.run(arg)  # a few additions: cheaper here than a thread hop
        return await self._runner.await_coro_and_return_result(self._context.invoke(comp, arg))


class _LocalMerge(computation_base.Computation):
    """A mergeable form's `merge` (`<A,A> -> A`, one TensorFlow graph), run here instead of on a worker.

    TFF's mergeable context folds the workers' partial aggregates with one remote `merge`
    per added worker, one after the other in completion order: both accumulators
    serialized and sent, the result received and deserialized, each time (issue 22 found
    this fold the largest part of an added worker's cost to the coordinator). The partial
    aggregates are already here, deserialized, and TFF's compiler makes `merge` a
    TensorFlow graph (`mergeable_comp_compiler` compiles it to TensorFlow, typically a
    sum of accumulators), so it runs here on the same values: in numpy where the graph
    only adds (W1 under yappi: ~10 ms a merge, half of it converting the inputs to
    eager tensors), else as a pruned function of that graph. `_ThreadedContext` runs it when the
    context hands it one.
    """

    def __init__(self, merge: computation_base.Computation, function: Callable[..., Any]):
        self._merge = merge
        self._function = function

    @classmethod
    def of(
        cls, merge: computation_base.Computation, *, numpy: bool = True
    ) -> _LocalMerge | computation_base.Computation:
        """`merge` to run here, or `merge` itself when it is not a stateless graph of tensors.

        In numpy where the graph only adds, concatenates and copies (`_numpy_graph`; not
        with `numpy=False`), else in TensorFlow.
        """
        proto = merge.to_building_block().proto if hasattr(merge, "to_building_block") else None
        if proto is None or proto.WhichOneof("computation") != "tensorflow" or proto.tensorflow.initialize_op:
            return merge
        for part in (merge.type_signature.parameter, merge.type_signature.result):
            if not type_analysis.contains_only(
                part, lambda t: isinstance(t, computation_types.StructType | computation_types.TensorType)
            ):
                return merge
        graph = proto.tensorflow
        graph_def = serialization_utils.unpack_graph_def(graph.graph_def)
        inputs = tensorflow_utils.extract_tensor_names_from_binding(graph.parameter)
        outputs = tensorflow_utils.extract_tensor_names_from_binding(graph.result)
        in_numpy = _numpy_graph(graph_def, inputs, outputs) if numpy else None
        if in_numpy is not None:
            parameter, result = merge.type_signature.parameter, merge.type_signature.result
            return cls(merge, lambda arg: _pack(result, iter(in_numpy(serialization.leaves(arg, parameter)))))
        if graph.session_token_tensor_name:
            inputs.append(graph.session_token_tensor_name)  # fed a constant: a merge keeps no session state

        def imported():
            tf.graph_util.import_graph_def(graph_def, name="")

        wrapped = tf.compat.v1.wrap_function(imported, [])
        pruned = wrapped.prune(
            [wrapped.graph.as_graph_element(n) for n in inputs], [wrapped.graph.as_graph_element(n) for n in outputs]
        )
        feeds = [wrapped.graph.as_graph_element(n).dtype for n in inputs]
        token = bool(graph.session_token_tensor_name)

        def function(arg):
            values = serialization.leaves(arg, merge.type_signature.parameter) + ([b""] if token else [])
            tensors = [tf.convert_to_tensor(v, d) for v, d in zip(values, feeds, strict=True)]
            # The flat call: `pruned(*tensors)` first tries the structured signature, which a
            # pruned function does not have, and formats every argument into the TypeError
            # it then catches (numpy's repr of each accumulator: ~50 ms of a 4.8 MB model).
            results = iter(t.numpy() for t in pruned._call_flat(tensors, pruned.captured_inputs))  # noqa: SLF001
            return _pack(merge.type_signature.result, results)

        return cls(merge, function)

    @property
    def type_signature(self) -> computation_types.FunctionType:
        return self._merge.type_signature

    def __call__(self, *args, **kwargs):
        return self._merge(*args, **kwargs)

    def __hash__(self) -> int:
        return hash(self._merge)

    def run(self, arg: Any) -> Any:
        return self._function(arg)


# Ops a merge graph evaluated in numpy may hold: a sum of accumulators (AddV2), evaluation's
# per-client vectors (ConcatV2), and what TFF wraps them in. numpy adds IEEE numbers as
# TensorFlow does (one rounding each), except that TensorFlow flushes subnormal results to 0.
_NUMPY_OPS = {"Placeholder", "Identity", "Const", "AddV2", "Add", "ConcatV2", "NoOp"}
_NUMPY_DTYPES = {tf.float16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8}


def _numpy_graph(graph_def, inputs: list[str], outputs: list[str]) -> Callable[[list], list] | None:
    """`graph_def`'s `outputs` from its `inputs` as a function of numpy values, if it only adds, concatenates, copies.

    A merge's bytes are the partial aggregates: in TensorFlow each of a merge's inputs is
    converted to an eager tensor and each output back (W1: 31 leaves, 4.8 MB, one merge per
    added worker); numpy adds them where they are. None when the
    graph holds another op or dtype (the caller runs it in TensorFlow).
    """
    nodes = {node.name: node for node in graph_def.node}
    feeds = {name.split(":")[0]: i for i, name in enumerate(inputs)}
    if any(not name.endswith(":0") for name in (*inputs, *outputs)):
        return None
    steps: dict[str, tuple] = {}  # node name -> (op, input node names, constant or dtype)

    def visit(name: str) -> bool:
        if name in steps:
            return True
        node = nodes.get(name)
        if node is None or node.op not in _NUMPY_OPS:
            return False
        data_inputs = [i for i in node.input if not i.startswith("^")]
        if any(":" in i and not i.endswith(":0") for i in data_inputs):
            return False  # a second output of some op
        data_inputs = [i.split(":")[0] for i in data_inputs]
        if node.op == "Placeholder":
            dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
            if name not in feeds or dtype not in _NUMPY_DTYPES:
                return False
            steps[name] = (node.op, [], dtype.as_numpy_dtype)
            return True
        if node.op == "Const":
            dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
            if dtype not in _NUMPY_DTYPES:
                return False
            steps[name] = (node.op, [], tf.make_ndarray(node.attr["value"].tensor))
            return True
        if node.op in ("AddV2", "Add", "ConcatV2") and tf.dtypes.as_dtype(node.attr["T"].type) not in _NUMPY_DTYPES:
            return False
        if node.op == "NoOp":
            return False  # no value
        if not all(visit(i) for i in data_inputs):
            return False
        if node.op in ("AddV2", "Add") and not all(source(i) in ("Placeholder", "Const") for i in data_inputs):
            # A sum of sums: TensorFlow's optimizer may make it one AddN, rounded otherwise than two adds.
            return False
        steps[name] = (node.op, data_inputs, None)
        return True

    def source(name: str) -> str:
        """The op of node `name` (visited), looking through identities."""
        op, args, _ = steps[name]
        return source(args[0]) if op == "Identity" else op

    output_nodes = [name.split(":")[0] for name in outputs]
    if not all(visit(name) for name in output_nodes):
        return None

    def fresh(name: str) -> bool:
        """Whether node `name`'s value is an array made by this call (not an input or a constant)."""
        op, args, _ = steps[name]
        return fresh(args[0]) if op == "Identity" else op not in ("Placeholder", "Const")

    # An input read once, by a sum, whose array a previous call made: the mergeable context
    # folds the partial aggregates, merge(merge(p1, p2), p3), ..., so the accumulator a merge
    # returns comes back as the next merge's first input, and nothing else holds it. The sum
    # goes into that array (the same additions, the same bits) instead of a new one: a new
    # 4.8 MB array a merge (W1) was page faults and a cold cache for every added worker.
    uses = collections.Counter(a for _, args, _ in steps.values() for a in args)
    uses.update(output_nodes)

    def read_once(name: str) -> bool:
        """Whether node `name` is an input (or an identity of one) that only this use reads."""
        op, args, _ = steps[name]
        return uses[name] == 1 and (op == "Placeholder" or (op == "Identity" and read_once(args[0])))

    reused = {name for name in steps if read_once(name)}
    made: dict[int, weakref.ref] = {}  # id -> the arrays this function returned, while they live

    def ours(array) -> bool:
        found = made.get(id(array))
        return found is not None and found() is array and array.flags.writeable

    def remember(array) -> None:
        key = id(array)
        made[key] = weakref.ref(array, lambda _: made.pop(key, None))

    def add(name: str, first, other, values: list):
        if (
            name in reused
            and ours(first)
            and sum(v is first for v in values) == 1  # not fed twice
            and first.dtype == np.result_type(first, other)
            and np.broadcast_shapes(first.shape, np.shape(other)) == first.shape
        ):
            return np.add(first, other, out=first)
        return np.add(first, other)

    def run(values: list) -> list:
        computed: dict[str, Any] = {}

        def value(name: str):
            if name not in computed:
                op, args, extra = steps[name]
                if op == "Placeholder":
                    computed[name] = np.asarray(values[feeds[name]], extra)
                elif op == "Const":
                    computed[name] = extra
                elif op == "Identity":
                    computed[name] = value(args[0])
                elif op == "ConcatV2":
                    computed[name] = np.concatenate([value(a) for a in args[:-1]], axis=int(value(args[-1])))
                else:
                    computed[name] = add(args[0], value(args[0]), value(args[1]), values)
            return computed[name]

        # As TensorFlow's `.numpy()`: a new array for each output (a copy where the output is an
        # input or a constant: what a sum makes is new already), a numpy scalar for a scalar.
        # And as TensorFlow, silently: an overflow gives inf (a NaN update is handled later).
        results = []
        with np.errstate(all="ignore"):
            for name in output_nodes:
                result = value(name)
                if not fresh(name) or any(r is result for r in results):  # as TensorFlow: an array each
                    result = np.array(result, copy=True)
                if result.ndim:
                    remember(result)
                results.append(result[()] if result.ndim == 0 else result)
        return results

    return run


def _pack(type_spec: computation_types.Type, leaves) -> Any:
    """The next of `leaves` in `type_spec`'s structure (a `tff.structure.Struct` for each struct)."""
    if isinstance(type_spec, computation_types.StructType):
        return structure.Struct([(name, _pack(t, leaves)) for name, t in structure.iter_elements(type_spec)])
    return next(leaves)


def _compile_with_local_merge(comp) -> mergeable_comp_execution_context.MergeableCompForm:
    form = mergeable_comp_compiler.compile_to_mergeable_comp_form(comp)
    form.merge = _LocalMerge.of(form.merge)
    return form


class _MergeableContext(mergeable_comp_execution_context.MergeableCompExecutionContext):
    """TFF's mergeable context (as `create_mergeable_comp_execution_context` makes it), whose
    workers share the values serialized during one invocation (forgotten after it), and whose
    partial aggregates are merged here (`_LocalMerge`).

    The argument is turned into numpy here, once (TFF's `transform_args`, as each worker's
    context would), and the result once: the workers' contexts take their arguments and
    results as they are. Each worker's context re-made the argument's containers (a tree
    walk of the state per worker), so the workers received equal states of different
    objects; now they receive the same object, which `SharedValues` finds by identity.
    """

    def __init__(self, workers: Sequence, *, local_merge: bool = True):
        self._shared = serialization.SharedValues()
        compile_once = _CompileOnce(_CONTEXT_ARGS["compiler_fn"])
        compile_form = (
            _compile_with_local_merge if local_merge else mergeable_comp_compiler.compile_to_mergeable_comp_form
        )
        super().__init__(
            [_ThreadedContext(_worker_context(_executors(w, self._shared), compile_once)) for w in workers],
            compiler_fn=compile_form,
            transform_result=_CONTEXT_ARGS["transform_result"],
        )
        _CompileOnce(compile_form).install(self)

    def invoke(self, comp, arg=None):
        try:
            return super().invoke(comp, _transform_args(arg))
        finally:
            self._shared.clear()


def _transform_args(arg: Any) -> Any:
    """`arg` as TFF's `AsyncExecutionContext.invoke` hands it on with TensorFlow's `transform_args` (TFF 0.87)."""
    if arg is None:
        return None
    transform = _CONTEXT_ARGS["transform_args"]

    def to_python(obj):
        return structure.to_odict_or_tuple(obj) if isinstance(obj, structure.Struct) else None

    if isinstance(arg, structure.Struct):
        args, kwargs = function_utils.unpack_args_from_struct(arg)
        return function_utils.pack_args_into_struct(
            transform(tree.traverse(to_python, args)), transform(tree.traverse(to_python, kwargs))
        )
    return transform(tree.traverse(to_python, arg))


class _SilentTracingProvider(tracing.LoggingTracingProvider):
    """TFF's logging tracing provider without its two debug records per span."""

    def span(self, scope, sub_scope, nonce, parent_span_yield, fn_args, fn_kwargs, trace_opts):
        del scope, sub_scope, nonce, parent_span_yield, fn_args, fn_kwargs, trace_opts
        yield None


def _install(workers: Sequence, cohort_sizes_kept: int = 2) -> None:
    _quiet_tracing()
    if len(workers) == 1:
        computations = serialization.SerializedComputations()
        context = _sync_context(_executors(workers[0], computations=computations, kept=cohort_sizes_kept))
    else:
        context = _MergeableContext(workers)
    context_stack_impl.context_stack.set_default_context(context)


def _quiet_tracing() -> None:
    if not logging.level_debug():
        # TFF's one tracing provider makes a debug log record per span, and every executor
        # call opens several (the remote executor's, the stub's, (de)serialization's) in
        # each worker's thread: under yappi, W1's spans took 29 ms of this process's CPU a
        # round at 4 workers against 8 at one. The records are only written at
        # --verbosity=1, which keeps them. One provider still: TFF's per-thread span stack
        # asserts one entry per provider, so a thread that opened a span before this (the
        # list emptied) would fail its next one.
        tracing.set_tracing_providers([_SilentTracingProvider()])


def install_local_context(
    *, max_concurrent_computation_calls: int = -1, log_path: str | None = None, cohort_sizes_kept: int = 2
) -> LocalWorker:
    """Makes one loopback-only, parent-bound local C++ worker TFF's default context; returns it.

    `cohort_sizes_kept`: executors kept on the worker, one per number of clients
    (`ExecutorPerCohortSize`). A benchmark that alternates N processes of different
    cohort sizes keeps N: with fewer, every call rebuilds its executor and instantiates
    its TensorFlow functions again (W3 grouped, 1,000 clients in 2 groups alternated with
    per-client and 1-group rounds: the worker's CPU a round 0.49-0.55 s with 2 kept,
    0.36-0.38 s with 4), which a run of one process never pays.
    """
    worker = LocalWorker(max_concurrent_computation_calls=max_concurrent_computation_calls, log_path=log_path)
    _install([worker], cohort_sizes_kept)
    return worker


@dataclasses.dataclass
class Runtime:
    """The workers of a run and the context over them (see the module doc for faults)."""

    workers: list
    retries: int = 2
    retried: int = 0

    @property
    def remote(self) -> bool:
        return any(isinstance(w, RemoteWorker) for w in self.workers)

    def start(self) -> Runtime:
        for worker in self.workers:
            worker.start()
        _install(self.workers)
        return self

    def check_data(self, fingerprint: Callable[[], Any], expected: Any, where: str) -> None:
        """Runs `fingerprint` (a TFF computation reading the data) on every worker; all must give `expected`."""
        if len(self.workers) == 1 and isinstance(self.workers[0], LocalWorker):
            return  # the same machine and file as this process
        for worker in self.workers:
            executors = _executors(worker)
            with context_stack_impl.context_stack.install(_sync_context(executors)):
                try:
                    found = fingerprint()
                except Exception as e:  # noqa: BLE001  (TFF wraps the worker's error in several types)
                    raise WorkerUnusable(
                        f"{worker.name} cannot read the run's data at {where} ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:200]}): every worker needs the same files at the "
                        "same path as this machine"
                    ) from None
                finally:
                    executors.close()  # else the worker keeps this check's executor for the whole run
            if tuple(map(int, found)) != tuple(map(int, expected)):
                raise WorkerUnusable(
                    f"{worker.name} serves other data than this run at {where} (fingerprint "
                    f"{fingerprint_text(found)}, here {fingerprint_text(expected)}): copy the same files there, "
                    "or restart it with the run's data flags"
                )

    def call(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(*args)`, run again on the workers left if a worker dies meanwhile."""
        attempts = 0
        while True:
            try:
                return fn(*args)
            except Exception:  # noqa: BLE001  (a dead worker surfaces as gRPC or executor errors)
                dead = [w for w in self.workers if not w.alive()]
                if not dead:
                    raise
                names = ", ".join(w.name for w in dead)
                # A process of ours is started again; a remote service is dropped, its channel
                # closed (a call still waiting on it in another thread ends).
                for worker in dead:
                    if not isinstance(worker, LocalWorker):
                        worker.stop()
                self.workers = [w for w in self.workers if w not in dead or isinstance(w, LocalWorker)]
                if not self.workers or attempts >= self.retries:
                    raise WorkerFault(
                        f"{names} stopped during a round, and {len(self.workers)} worker(s) remain after "
                        f"{attempts} retries; the run stops here with its last checkpoint. Restart the worker(s) "
                        "and rerun the same command to resume."
                    ) from None
                logging.warning("%s stopped during a round; retrying on %d worker(s)", names, len(self.workers))
                attempts += 1
                self.retried += 1
                for worker in self.workers:
                    worker.start()
                _install(self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def fingerprint_text(values) -> str:
    return "-".join(f"{int(v) & 0xFFFFFFFFFFFFFFFF:016x}" for v in values)[:40]


def create(
    *,
    remote: Sequence[str] = (),
    local_workers: int = 1,
    pin: bool = False,
    log_dir: str | None = None,
    retries: int = 2,
) -> Runtime:
    """The run's workers: `remote` addresses, or `local_workers` started here (optionally one CPU each)."""
    if remote:
        workers = [RemoteWorker(address) for address in remote]
    else:
        cpus = sorted(os.sched_getaffinity(0))
        workers = [
            LocalWorker(
                log_path=os.path.join(log_dir, "worker.log" if local_workers == 1 else f"worker-{i}.log")
                if log_dir
                else None,
                cpus=[cpus[i % len(cpus)]] if pin else None,
            )
            for i in range(local_workers)
        ]
    return Runtime(workers, retries=retries)


class ResilientProcess:
    """A learning process whose `next` runs through `Runtime.call` (a dead worker's round is retried)."""

    def __init__(self, process, runtime: Runtime):
        self._process = process
        self._runtime = runtime

    def __getattr__(self, name: str):
        return getattr(self._process, name)

    def next(self, state, clients):
        return self._runtime.call(self._process.next, state, clients)


def data_fingerprint(path: str) -> tuple[Callable[[], Any], tuple[int, int]]:
    """(a computation that reads `path` where it runs, its value on this machine).

    The count of `client_metadata` rows and a sum of their hashes (client, split,
    examples): a worker whose file at that path differs in any client gives another
    value. It runs as TensorFlow in the worker, the process that reads the file when it
    builds client datasets, so it checks what the rounds will actually read.
    """
    query = "SELECT client_id || '|' || split_name || '|' || CAST(num_examples AS TEXT) FROM client_metadata"

    def read():
        rows = tf.data.experimental.SqlDataset("sqlite", path, query, (tf.string,))

        def add(total, row):
            return total[0] + 1, total[1] + tf.strings.to_hash_bucket_fast(row[0], 2**62)

        return rows.reduce((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), add)

    here = tuple(int(v) for v in tf.function(read)())
    return tff.tensorflow.computation(read), here
