"""The TFF execution context tffpipe runs in: TFF's local C++ worker, started safely.

TFF 0.87 runs computations in a `worker_binary` process that its default context
starts lazily. Left as TFF starts it, that process (1) outlives Python after a
`kill -9` or a crash, (2) inherits stdout, so `python -m experiments.train | tail`
never sees end-of-file, and (3) serves gRPC on all interfaces without
authentication. This module starts the same binary behind TFF's own remote executor,
but with the kernel told to kill it when its parent dies (PR_SET_PDEATHSIG), its
output sent to a log file or discarded, and a preloaded shim that rewrites wildcard
binds to loopback (`_native/loopback_bind.c`).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
from typing import IO

import grpc
import portpicker
import tensorflow_federated as tff
from absl import logging
from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import remote_executor, remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.types import placements

from tffpipe import processes

_WORKER_BINARY = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")
LOOPBACK_SHIM = os.path.join(os.path.dirname(__file__), "_native", "libloopback_bind.so")
_GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class LocalWorker:
    """One TFF C++ worker process on 127.0.0.1, owned by this Python process."""

    def __init__(self, *, max_concurrent_computation_calls: int = -1, log_path: str | None = None):
        self._max_calls = max_concurrent_computation_calls
        self._log_path = log_path
        self._process: subprocess.Popen | None = None
        self._stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub | None = None
        self._log_file: IO[bytes] | None = None
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def loopback_only(self) -> bool:
        return os.path.isfile(LOOPBACK_SHIM)

    def stub(self) -> remote_executor_grpc_stub.RemoteExecutorGrpcStub:
        """Returns a ready stub, starting (or restarting) the worker when needed."""
        if self._stub is not None and self._stub.is_ready:
            return self._stub
        self.stop()
        port = portpicker.pick_unused_port()
        env = dict(os.environ)
        # Clients run concurrently (one computation call each), which already fills the
        # cores; splitting each op over more threads on top only adds hand-offs. W2 rounds
        # 305/293 -> 260/242 ms, W1 unchanged (BENCHMARKS.md). A user's setting wins.
        env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        if self.loopback_only:
            env["LD_PRELOAD"] = " ".join(filter(None, [LOOPBACK_SHIM, env.get("LD_PRELOAD")]))
        else:
            logging.warning(
                "TFF worker starts WITHOUT the loopback shim (%s missing; run `make env`): "
                "it listens on all interfaces.",
                LOOPBACK_SHIM,
            )
        out = subprocess.DEVNULL
        if self._log_path:
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115  (closed in stop())
            out = self._log_file
        self._process = subprocess.Popen(
            [_WORKER_BINARY, f"--port={port}", f"--max_concurrent_computation_calls={self._max_calls}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            preexec_fn=processes.die_with_parent,
        )
        channel = grpc.insecure_channel(f"localhost:{port}", _GRPC_OPTIONS)
        self._stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)
        deadline = time.monotonic() + 60
        while not self._stub.is_ready:
            if self._process.poll() is not None:
                raise RuntimeError(f"TFF worker exited at start with code {self._process.returncode}.")
            if time.monotonic() > deadline:
                raise RuntimeError("TFF worker did not become ready within 60 s.")
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


def install_local_context(*, max_concurrent_computation_calls: int = -1, log_path: str | None = None) -> LocalWorker:
    """Makes a loopback-only, parent-bound local C++ worker TFF's default context.

    Args:
      max_concurrent_computation_calls: clients the worker trains at once (-1: no limit).
      log_path: where the worker's stdout/stderr go; discarded when None.

    Returns:
      The worker, so callers can stop it or read its pid.
    """
    worker = LocalWorker(max_concurrent_computation_calls=max_concurrent_computation_calls, log_path=log_path)

    def stack_fn(cardinalities):
        cardinalities.setdefault(placements.CLIENTS, 0)
        executor = remote_executor.RemoteExecutor(worker.stub())
        executor.set_cardinalities(cardinalities)
        return executor

    context = sync_execution_context.SyncExecutionContext(
        executor_fn=python_executor_stacks.ResourceManagingExecutorFactory(stack_fn),
        compiler_fn=compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
    )
    context_stack_impl.context_stack.set_default_context(context)
    return worker
