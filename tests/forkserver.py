"""Runs short `python -m experiments.<binary>` commands, each in a process forked from one that imported TF.

A bad-input case of a binary that gets as far as TensorFlow spends ~5 s (quiet machine,
30-60 s under load) importing TensorFlow and TFF before it prints its one `error:` line;
the bad-input tables paid that once per case. Here one server process imports the heavy
modules once, and each case runs in a child forked from it: `experiments.<binary>`
executed as `__main__` (as `python -m` does, so the binary's own `cli.start` parses
argv), with file descriptors 0-2 of its own (/dev/null and two files, so what C++ code
prints is caught too), and the interpreter's own exit (SystemExit mapped to a code,
non-daemon threads joined, atexit handlers run) before `os._exit`.

What differs from a fresh interpreter is only that the imports happened before the
binary's start-up: `tests/cli_test.py` keeps fresh-process runs for what happens at
import (the TF log level, the environment check), and the bad-input table keeps a few
fresh-process cases. Forking keeps only the forking thread, so TFF's event-loop thread,
started at its import, is not in the children: a case that reached a TFF computation
would hang there and fail by its timeout (bad input is refused before that).

Protocol (`python -m tests.forkserver tensorflow,tffpipe.program`): one JSON request a
line on stdin, {"cases": [[binary, [args...]], ...], "parallel": N, "timeout": seconds},
answered by one JSON line, [{"returncode": int, "stdout": str, "stderr": str}, ...].
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the binaries import once their flags are valid (TF, TFF, the library), for `Server(preload=...)`.
BINARY_IMPORTS = (
    "tensorflow",
    "tffpipe.program",
    "tffpipe.evaluation",
    "tffpipe.runtime",
    "tffpipe.export",
    "tffpipe.personalization",
    "experiments.flag_groups",
)


class Server:
    """A server process that imported `preload`; `run` forks one child per case from it.

    Use as a context manager (conftest's session-scoped `forks`), so the imports are paid
    once for every table of cases in the run.
    """

    def __init__(self, preload: Sequence[str]):
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed in __exit__)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", ",".join(preload)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def run(
        self, cases: Sequence[tuple[str, Sequence[str]]], *, parallel: int = 2, timeout: float = 180
    ) -> list[subprocess.CompletedProcess]:
        """Runs each (binary, args) as `python -m experiments.<binary> *args`, `parallel` at a time.

        Returns one CompletedProcess per case, in order; a case running longer than
        `timeout` seconds is killed (returncode -9).
        """
        request = {"cases": [[binary, list(args)] for binary, args in cases], "parallel": parallel, "timeout": timeout}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._log.seek(0)
            raise RuntimeError(f"the fork server exited ({self._process.wait()}): {self._log.read()[-3000:]}")
        return [
            subprocess.CompletedProcess(
                [sys.executable, "-m", f"experiments.{binary}", *args], r["returncode"], r["stdout"], r["stderr"]
            )
            for (binary, args), r in zip(cases, json.loads(line), strict=True)
        ]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self._process.kill()  # it holds nothing to save, and TF's orderly exit takes seconds
        self._process.wait(timeout=60)
        self._process.stdin.close()
        self._process.stdout.close()
        self._log.close()


def _exit_code(e: SystemExit) -> int:
    """What the interpreter exits with for this SystemExit (it prints a code that is not an integer)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _child(binary: str, args: Sequence[str], out: str, err: str) -> int:
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        os.dup2(os.open(path, mode), fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    sys.argv = ["-m", *args]  # runpy puts the module's path first, as `python -m` does
    try:
        runpy.run_module(f"experiments.{binary}", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException as e:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    threading._shutdown()  # the interpreter's exit: wait for non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def _serve(cases: list, parallel: int, timeout: float) -> list[dict]:
    # Not tempfile.TemporaryDirectory: its finalizer is an atexit handler, which each child runs.
    directory = tempfile.mkdtemp(prefix="forkserver-")
    try:
        results: list[dict | None] = [None] * len(cases)
        running: dict[int, tuple[int, float]] = {}  # pid -> (case index, start)
        pending = list(range(len(cases)))
        while pending or running:
            while pending and len(running) < parallel:
                i = pending.pop(0)
                out, err = (os.path.join(directory, f"{i}.{s}") for s in ("out", "err"))
                for path in (out, err):
                    open(path, "w").close()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _child(*cases[i], out, err)
                    finally:
                        os._exit(code)
                running[pid] = (i, time.monotonic())
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                for child, (_, start) in running.items():
                    if time.monotonic() - start > timeout:
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.02)
                continue
            if pid not in running:
                continue  # not a case (a child of a preloaded module)
            i, _ = running.pop(pid)
            with open(os.path.join(directory, f"{i}.out")) as out, open(os.path.join(directory, f"{i}.err")) as err:
                code = os.waitstatus_to_exitcode(status)
                results[i] = {"returncode": code, "stdout": out.read(), "stderr": err.read()}
        return results
    finally:
        shutil.rmtree(directory)


def main() -> None:
    # Answers go to a copy of stdout; fd 1 itself points at stderr, so nothing a preloaded module prints mixes in.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in filter(None, sys.argv[1].split(",")):
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(_serve(request["cases"], request["parallel"], request["timeout"])) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
