"""The program's own output: the per-round progress line."""

import io
import math

from tffpipe import program


def _line(private: bool, epsilon: float) -> str:
    stream = io.StringIO()
    printer = program.ProgressPrinter(10, stream, private=private)
    printer(1, {"system/round_seconds": 2.0, "train/loss": 1.5, "train/accuracy": 0.25, "privacy/epsilon": epsilon})
    return stream.getvalue().strip()


def test_a_round_line_shows_epsilon_only_with_dp():
    # ETA: median 2.0 s x 9 rounds left = 18 s.
    assert _line(True, 1.23456) == "round  1/10 |  2.00s | ETA 0m18s | loss 1.5000 | acc 0.2500 | eps 1.23"
    # Without DP epsilon is infinite: no number to print (the start and end lines say there is no DP).
    assert _line(False, math.inf) == "round  1/10 |  2.00s | ETA 0m18s | loss 1.5000 | acc 0.2500"
