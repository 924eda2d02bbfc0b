import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tffpipe import processes


def _square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_results_come_in_order_from_worker_processes():
    results = list(processes.map_in_processes(_square, [(i,) for i in range(6)], processes=2))
    assert [r for r, _ in results] == [0, 1, 4, 9, 16, 25]
    assert os.getpid() not in {pid for _, pid in results}
    assert list(processes.map_in_processes(_square, [(3,)], processes=1)) == [(9, os.getpid())]


def _indices(offset: int, indices: range) -> list[int]:
    return [offset + i for i in indices]


def test_ranges_cover_the_total_in_order_and_progress_counts_what_was_consumed():
    seen, calls = [], []
    for result in processes.map_over_ranges(
        _indices, 100, 7, chunk=3, processes=1, progress=lambda *a: calls.append(a)
    ):
        seen += result
        calls.append(("consumed", len(seen)))
    assert seen == [100, 101, 102, 103, 104, 105, 106]
    assert calls == [("consumed", 3), (3, 7), ("consumed", 6), (6, 7), ("consumed", 7), (7, 7)]


def test_a_stop_request_raises_interrupted_and_leaves_no_worker():
    def pool_workers() -> set[int]:  # spawned workers run spawn_main (multiprocessing's resource tracker does not)
        return {p.pid for p in psutil.Process().children() if "spawn_main" in _command_line(p)}

    before = pool_workers()
    pool = set()

    def stop_requested() -> bool:  # polled every 0.2 s once the tasks are submitted
        pool.update(pool_workers() - before)  # a worker shows `spawn_main` only once it has exec'd Python
        return len(pool) >= 2 or time.monotonic() - began > 10

    began = time.monotonic()
    with pytest.raises(processes.Interrupted):
        for _ in processes.map_in_processes(time.sleep, [(30,)] * 6, processes=2, stop_requested=stop_requested):
            pass
    assert len(pool) == 2  # the pool's two workers, with six 30 s tasks to run
    assert time.monotonic() - began < 15  # they were stopped, not waited for
    assert {p.pid for p in psutil.Process().children()} & pool == set()  # and reaped: not even a zombie


def test_pool_workers_die_with_a_sigkilled_parent(tmp_path):
    script = textwrap.dedent(
        """
        import os, time
        from tffpipe import processes
        def spin(x):
            os.write(1, f"{os.getpid()}\\n".encode())  # one write: print's two may interleave with the other worker's
            time.sleep(120)
        if __name__ == "__main__":
            for _ in processes.map_in_processes(spin, [(1,), (2,)], processes=2):
                pass
        """
    )
    (tmp_path / "spin.py").write_text(script)  # spawn imports the main module by its file
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "spin.py")], stdout=subprocess.PIPE, text=True, env=env)
    workers = {int(parent.stdout.readline()), int(parent.stdout.readline())}
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")]


def _answer_crash_or_raise(what: str) -> int:
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)  # as native code crashing in the child would
    if what == "raise":
        raise ValueError("bad value 7")
    return os.getpid()


def test_a_child_answers_raises_again_here_or_dies_as_one_named_error():
    before = {p.pid for p in psutil.Process().children()}
    pid = processes.call_in_child(_answer_crash_or_raise, "answer")
    assert pid != os.getpid()  # computed in another process
    with pytest.raises(ValueError, match="bad value 7"):
        processes.call_in_child(_answer_crash_or_raise, "raise")
    with pytest.raises(processes.ChildDied, match="^killed by SIGSEGV$"):
        processes.call_in_child(_answer_crash_or_raise, "crash")
    assert {p.pid for p in psutil.Process().children()} - before <= _resource_trackers()  # each child reaped


def _resource_trackers() -> set[int]:
    """multiprocessing's resource tracker, started once with the first spawned child, stays by design."""
    return {p.pid for p in psutil.Process().children() if "resource_tracker" in _command_line(p)}


def _command_line(process: psutil.Process) -> str:
    """The child's command line; empty for one that has already exited (another test's zombie)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""
