"""benchmarks.workers refuses bad flags in one line before it starts anything, and stops what it started on failure.

Each case is a fresh interpreter: the benchmark defines absl flags (`--rounds`, `--cache_dir`) that the
experiments' flag groups also define, so it cannot be imported into the test process. The three run at
once (~5 s each, importing TensorFlow).
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# watchdog_cost with everything before its worker stubbed, and the remote worker failing to connect.
LEAK = textwrap.dedent(
    """
    import json, types
    from benchmarks import workers
    from tffpipe import runtime

    workers.FLAGS(["workers", "--cache_dir=/nonexistent"])
    workers.program = types.SimpleNamespace(
        check=lambda config: None, prepare=lambda config: types.SimpleNamespace(task=None, plan=None)
    )
    workers.tasks = types.SimpleNamespace(data_source=lambda config: types.SimpleNamespace(prepare=lambda: None))
    workers.algorithms = types.SimpleNamespace(build_learning_process=lambda *args: None)
    started = []
    start = runtime.LocalWorker.start
    runtime.LocalWorker.start = lambda self: started.append(self) or start(self)

    def refuse(self):
        raise runtime.WorkerUnusable("refused on purpose")

    runtime.RemoteWorker.start = refuse
    try:
        workers.watchdog_cost("w1", 2)
        failed = None
    except runtime.WorkerUnusable as e:
        failed = str(e)
    print(json.dumps({"failed": failed, "started": len(started), "alive": [w.alive() for w in started]}))
    """
)


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_bad_flags_are_one_error_line_and_a_failed_start_leaves_no_worker(tmp_path):
    out_dir = tmp_path / "results"
    runs = {
        "unparsable": _start("-m", "benchmarks.workers", "--watchdog", "--rounds=abc", f"--out_dir={out_dir}"),
        "not a count": _start("-m", "benchmarks.workers", "--workloads=w1", "--per_worker=1,x", f"--out_dir={out_dir}"),
        "leak": _start("-c", LEAK),
    }
    done = {name: (*p.communicate(timeout=300), p.returncode) for name, p in runs.items()}
    for name, flag in (("unparsable", "--rounds"), ("not a count", "--per_worker")):
        out, err, code = done[name]
        lines = [line for line in err.splitlines() if line.strip() and not _tf_noise(line)]
        assert code == 2, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], (name, lines)
        assert out == ""
    assert not out_dir.exists()  # nothing written
    out, err, code = done["leak"]
    assert code == 0, err[-3000:]
    found = json.loads(out.strip().splitlines()[-1])
    assert found["failed"] == "refused on purpose"
    assert found["started"] == 1 and found["alive"] == [False]  # the loopback worker was stopped


def _tf_noise(line: str) -> bool:
    """TensorFlow's and TFF's own start-up lines on stderr (C++ logging, before our code runs)."""
    return line[:4].isdigit() or line.startswith(("WARNING: All log messages", "To enable the following", "I0000"))
