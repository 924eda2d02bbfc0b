"""The data card binary: each task's picture goes to its own file."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_keyboard_card_writes_its_own_picture_not_the_emnist_one(tmp_path):
    # Run where docs/ is a scratch directory: the default --png is relative to the working directory.
    command = [sys.executable, "-m", "experiments.data_card", "--task=keyboard", "--num_users=12"]
    command += ["--median_messages=8", "--vocab_size=100", "--writers=3", f"--cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sample grid: docs/keyboard_samples.png" in proc.stdout
    assert os.listdir(tmp_path / "docs") == ["keyboard_samples.png"]  # docs/samples.png (EMNIST's) untouched
    with open(tmp_path / "docs" / "keyboard_samples.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
