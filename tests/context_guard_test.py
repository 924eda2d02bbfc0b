"""A TFF computation called before tffpipe installs its context fails loudly and opens no port."""

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tffpipe import context_guard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "TFFPIPE_CONTEXT_GUARD_TEST"

# What the binaries (cli.start) and the test session (conftest) do at start, then a computation with no context.
_CHILD = """
from tffpipe import context_guard
context_guard.refuse_once_imported()
import tensorflow as tf
import tensorflow_federated as tff

@tff.tensorflow.computation
def one():
    return tf.constant(1)

try:
    print("ran:", one(), flush=True)
except context_guard.NoContextError as e:
    print("refused:", e, flush=True)
"""


def _marked(mark: str) -> set[int]:
    """PIDs of the processes whose environment carries `mark` (the child's and whatever it started)."""
    needle = f"{MARK}={mark}".encode()
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.add(int(entry))
        except (OSError, ValueError):
            continue  # not a process, gone, or not ours
    return pids


def _wildcard_listeners(pids: set[int]) -> set[tuple[int, int]]:
    """(pid, port) of each TCP socket of `pids` listening on 0.0.0.0 or ::."""
    wildcard = {}  # socket inode -> port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, port = fields[1].split(":")
                if fields[3] == "0A" and set(address) == {"0"}:  # 0A: LISTEN
                    wildcard[fields[9]] = int(port, 16)
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found |= {
            (pid, wildcard[link[8:-1]]) for link in links if link.startswith("socket:[") and link[8:-1] in wildcard
        }
    return found


def test_a_computation_without_tffpipes_context_fails_loudly_and_leaves_no_wildcard_listener():
    mark = uuid.uuid4().hex
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            cwd=REPO,
            env={**os.environ, MARK: mark},
            capture_output=True,
            text=True,
            timeout=180,
        )
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # with TFF's default context the child did not exit (seen once)
        out, err = (e.stdout or b"").decode(), f"timed out; stderr: {(e.stderr or b'').decode()}"
    left = _marked(mark)  # TFF's default context's worker_binary, orphaned, would carry the mark
    listening = _wildcard_listeners(left)
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # ours (it carries the mark): never leave it running
    assert out == f"refused: {context_guard.MESSAGE}\n", err
    assert left == set() and listening == set()


def test_this_test_session_refuses_tffs_default_context():
    # conftest arms the guard before any test imports TFF; a test that forgets tff_context then fails loudly.
    assert context_guard.armed()


def test_a_late_call_leaves_an_installed_context_alone_and_still_refuses_tffs_own(tff_context):
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    @tff.tensorflow.computation
    def one():
        return tf.constant(1)

    stack = context_stack_impl.context_stack
    installed = stack.current  # tffpipe's local worker (the tff_context fixture)
    try:
        # Late: TFF is imported and tffpipe's context installed, as when a binary's cli.start runs
        # after a library caller has installed one. It stays, and computations still run on it.
        context_guard.refuse_once_imported()
        assert stack.current is installed
        assert one() == 1
        # TFF's own default (what its __init__ installs) is still replaced by a late call. Never
        # invoked here: it would start a worker listening on every address.
        tffs_own = tff.backends.native.create_sync_local_cpp_execution_context()
        stack.set_default_context(tffs_own)
        context_guard.refuse_once_imported()
        assert stack.current is not tffs_own
        with pytest.raises(context_guard.NoContextError):
            stack.current.invoke(one, None)
    finally:
        stack.set_default_context(installed)
