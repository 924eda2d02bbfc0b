import os
import subprocess
import sys

from tffpipe import environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_matching_environment_has_no_problems():
    pins = {"tensorflow": "2.14.1", "numpy": "1.25.2"}
    assert environment.find_problems((3, 11, 7), pins.get, pins) == []


def test_wrong_python_and_versions_are_each_named_with_the_fix():
    installed = {"tensorflow": "2.15.0", "numpy": "1.25.2"}
    required = {"tensorflow": "2.14.1", "numpy": "1.25.2", "tensorflow-federated": "0.87.0"}
    problems = environment.find_problems((3, 12, 1), installed.get, required)
    assert problems == [
        "Python 3.12.1 found; tffpipe needs Python 3.9-3.11 (TensorFlow Federated 0.87 has no wheels for newer).",
        "tensorflow 2.15.0 found; tffpipe needs tensorflow==2.14.1.",
        "tensorflow-federated is not installed; tffpipe needs tensorflow-federated==0.87.0.",
    ]
    message = environment.format_problems(problems)
    assert message.startswith("tffpipe cannot start in this environment:")
    assert "make env" in message


def test_binary_on_bare_interpreter_prints_one_message_and_exits_2():
    # -S hides site-packages: TF, TFF and friends all look uninstalled.
    env = {k: v for k, v in os.environ.items() if k != environment.SKIP_VARIABLE}
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "experiments.train", "--rounds=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "tensorflow is not installed; tffpipe needs tensorflow==2.14.1." in proc.stderr
    assert "Traceback" not in proc.stderr
