"""Child processes that cannot outlive the process that started them (standard library only).

A run killed with SIGKILL cannot clean up after itself, so every child it starts (TFF
workers, TensorBoard, data-generation workers, TFLite converters) asks the kernel to
kill it when its parent dies (`PR_SET_PDEATHSIG`): programs through `spawn`, Python
pool workers and `call_in_child`'s one-off children in their initializer. Pool workers
are started with `spawn`, so their parent is the run itself (a `forkserver` would be
their parent, and it survived a SIGKILLed run with 1.2 GB of workers), and they ignore
SIGINT: Ctrl-C reaches the whole process group, and only the run decides what to do
with it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tffpipe import errors

_PR_SET_PDEATHSIG = 1


class Interrupted(Exception):  # noqa: N818  (a stop the user asked for, not an error)
    """Work stopped because the user asked it to (SIGINT/SIGTERM); nothing partial was kept."""


SHIM = os.path.join(os.path.dirname(__file__), "_native", "libloopback_bind.so")


class ShimMissing(errors.Fault):
    """The preloaded library `spawn` relies on is not built (`make env` builds it): an install step."""

    exit_code = 2


def spawn(
    argv: Sequence[str],
    *,
    stdout: Any = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    cpus: Sequence[int] | None = None,
) -> subprocess.Popen:
    """Starts `argv` as a child that dies with this process: the one place children are spawned.

    The child's death signal (PR_SET_PDEATHSIG) and CPUs are set by the preloaded shim
    (`_native/loopback_bind.c`) in the exec'd program, before its main(), from
    TFFPIPE_PARENT_PID and TFFPIPE_CPUS; the shim also keeps its wildcard binds off the
    network (TFFPIPE_BIND_ADDRESS, 127.0.0.1 unless `env` says otherwise). No Python
    runs between fork and exec: with gRPC's threads live in this process, a forked
    child running Python can hang on a lock one of them held (a run with 10 local
    workers hung that way), and gRPC prints a fork warning for each child. Standard
    input is closed; stderr goes where stdout goes.

    Raises:
      ShimMissing: the shim is not built.
    """
    if not os.path.isfile(SHIM):
        raise ShimMissing(
            f"{SHIM} is not built; without it a child could outlive this process and a TFF worker would listen on "
            "every interface: run `make env`, or `cc -shared -fPIC -O2 -o tffpipe/_native/libloopback_bind.so "
            "tffpipe/_native/loopback_bind.c -ldl`"
        )
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join(filter(None, [SHIM, env.get("LD_PRELOAD")]))
    env["TFFPIPE_PARENT_PID"] = str(os.getpid())
    env["TFFPIPE_CPUS"] = ",".join(map(str, cpus)) if cpus is not None else ""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, env=env)


def die_with_parent(parent_pid: int | None = None) -> None:
    """In a Python child (a pool worker's initializer): SIGKILL me when my parent exits.

    Exits at once if the parent is no longer `parent_pid`. Never as a `preexec_fn`
    (see `spawn`).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect


def _init_pool_worker(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ChildDied(errors.Fault):
    """A Python child ended without an answer: killed by a signal (a crash in native code) or exited."""


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode} without an answer"


def _child_main(parent_pid: int, sender, fn: Callable[..., Any], args: tuple) -> None:
    _init_pool_worker(parent_pid)
    try:
        answer = (True, fn(*args))
    except Exception as e:  # noqa: BLE001  (the parent decides what a failure means)
        answer = (False, e)
    try:
        sender.send(answer)
    except Exception as e:  # noqa: BLE001  (an exception that does not pickle still reaches the parent)
        sender.send((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} (unpicklable: {e})")))
    sender.close()


def call_in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Returns `fn(*args)` computed in a fresh Python child: for native code that may crash.

    A segfault in the child (TF 2.14's int8 calibrator on a WHILE graph, say) becomes a
    `ChildDied` here instead of killing this process. The child is started with
    `spawn` and dies with this process (as `map_in_processes`' workers); an exception
    in `fn` is raised here again.

    Args:
      fn: a module-level function (pickled by reference); its arguments and result pickle.

    Raises:
      ChildDied: the child was killed (the message names the signal) or exited without an answer.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(os.getpid(), sender, fn, args), daemon=True)
    child.start()
    sender.close()  # the child holds the only writer: its death ends `recv` with EOFError
    try:
        try:
            ok, value = receiver.recv()
        except EOFError:
            child.join()
            raise ChildDied(_describe_exit(child.exitcode)) from None
        child.join()
    finally:
        if child.is_alive():  # interrupted while waiting: stop the child at once
            child.kill()
            child.join()
        receiver.close()
    if not ok:
        raise value
    return value


def map_in_processes(
    fn: Callable[..., Any],
    args: Sequence[tuple],
    *,
    processes: int | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Iterator[Any]:
    """Yields `fn(*a)` for each `a` in `args`, in order, computed on worker processes.

    Args:
      fn: a module-level function (pickled by reference).
      args: argument tuples, one task each.
      processes: worker processes; None: one per core; 1 runs in this process.
      stop_requested: polled before each result is yielded; True cancels what is
        left, stops the workers and raises `Interrupted`.
    """
    processes = processes or os.cpu_count() or 1
    if processes <= 1 or len(args) <= 1:
        for a in args:
            if stop_requested():
                raise Interrupted
            yield fn(*a)
        return
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        min(processes, len(args)), mp_context=context, initializer=_init_pool_worker, initargs=(os.getpid(),)
    )
    completed = False
    try:
        futures = [pool.submit(fn, *a) for a in args]
        for future in futures:
            while True:
                if stop_requested():
                    raise Interrupted
                try:
                    yield future.result(timeout=0.2)
                    break
                except concurrent.futures.TimeoutError:
                    continue
        completed = True
    finally:
        if not completed:  # Interrupted, KeyboardInterrupt, an error or a closed generator: stop at once
            for process in list((pool._processes or {}).values()):
                if process.is_alive():
                    process.kill()
        pool.shutdown(wait=True, cancel_futures=True)


def map_over_ranges(
    fn: Callable[[Any, range], Any],
    config: Any,
    total: int,
    *,
    chunk: int,
    processes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Iterator[Any]:
    """Yields `fn(config, r)` for consecutive ranges `r` of `chunk` indices covering `range(total)`.

    In order, on worker processes (`map_in_processes`); `progress(done, total)` is called
    after the caller has consumed each result, so "done" counts what was written.
    """
    ranges = [range(s, min(s + chunk, total)) for s in range(0, total, chunk)]
    results = map_in_processes(fn, [(config, r) for r in ranges], processes=processes, stop_requested=stop_requested)
    done = 0
    for indices, result in zip(ranges, results, strict=True):
        yield result
        done += len(indices)
        if progress is not None:
            progress(done, total)
