"""The FLOP rate TensorFlow reaches on a dense model's training matmuls batched across clients.

  python -m benchmarks.matmul_limit --layers=784x200,200x200,200x10 --rows=2000
  TF_NUM_INTRAOP_THREADS=1 python -m benchmarks.matmul_limit ...   # the worker's setting

The limit that client groups are measured against (issue 21): if a round's K clients of
batch B took their steps as one model on K*B rows, each step of a Dense stack would be,
per layer (in, out), the forward GEMM [R x in] x [in x out], the weight gradient
[in x R] x [R x out] and, for every layer but the first, the input gradient
[R x out] x [out x in], R = K*B: 2*R*in*out FLOPs each. This times exactly those GEMMs
(random float32 operands, one `tf.function`, the median of the timed calls) with the
op threads TF is given (`TF_NUM_INTRAOP_THREADS`, as the worker is started), and prints
one JSON line: GFLOP/s (per wall second, median call, and per CPU second), the threads
and the call times. Biases and activations are left
out of both the FLOPs and the time: they are not what bounds a dense step.

`benchmarks.client_groups` runs it in a child process (TF fixes its thread pools when
it starts), before and after a workload's rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Only when run as a binary, so tests import the arithmetic without defining flags.
    flags.DEFINE_list("layers", ["784x200", "200x200", "200x10"], "Dense layers as INxOUT, first layer first.")
    flags.DEFINE_integer("rows", 2000, "R: the rows of every GEMM (clients x batch).")
    flags.DEFINE_float("seconds", 1.0, "Time the GEMMs for about this long, after warm-up.")


def parse_layers(values: list[str]) -> list[tuple[int, int]]:
    """'784x200' -> (784, 200), in order."""
    layers = []
    for v in values:
        a, sep, b = v.partition("x")
        if not sep or not a.isdigit() or not b.isdigit() or int(a) < 1 or int(b) < 1:
            raise ValueError(f"a layer is INxOUT with positive sizes, e.g. 784x200; got {v!r}")
        layers.append((int(a), int(b)))
    return layers


def step_flops(layers: list[tuple[int, int]], rows: int) -> int:
    """FLOPs of one training step's GEMMs on `rows` examples (forward, weight and input gradients).

    Per layer 2*rows*in*out for each of its GEMMs: two for the first layer (its input
    gradient is not needed), three for the others. W2's mlp (62 classes) at 1 row:
    2 * (784*200*2 + 200*200*3 + 200*62*3) = 941,600.
    """
    return sum(2 * rows * i * o * (2 if n == 0 else 3) for n, (i, o) in enumerate(layers))


def measure(layers: list[tuple[int, int]], rows: int, seconds: float) -> dict:
    """GFLOP/s of `step_flops` timed as one `tf.function` call per step."""
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.standard_normal((rows, i), np.float32)) for i, _ in layers]
    ws = [tf.constant(rng.standard_normal((i, o), np.float32) * 0.05) for i, o in layers]
    gs = [tf.constant(rng.standard_normal((rows, o), np.float32)) for _, o in layers]

    @tf.function
    def step():
        out = []
        for n, (x, w, g) in enumerate(zip(xs, ws, gs, strict=True)):
            out.append(tf.linalg.matmul(x, w))  # forward
            out.append(tf.linalg.matmul(x, g, transpose_a=True))  # weight gradient
            if n:
                out.append(tf.linalg.matmul(g, w, transpose_b=True))  # input gradient
        return out

    for _ in range(3):
        step()
    times = []
    began, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - began < seconds or len(times) < 5:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    median = float(np.median(times))
    return {
        "gflops_per_second": step_flops(layers, rows) / median / 1e9,
        # Per CPU second of this process (all its threads): what the cores deliver when
        # they run it, whatever else shares them.
        "gflops_per_cpu_second": step_flops(layers, rows) * len(times) / max(cpu, 1e-9) / 1e9,
        "step_seconds_median": median,
        "step_seconds_min": min(times),
        "calls": len(times),
        "rows": rows,
        "layers": [list(layer) for layer in layers],
        "intra_op_threads": os.environ.get("TF_NUM_INTRAOP_THREADS", "TF default"),
    }


def main(argv) -> None:
    del argv
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS")
    if threads:  # before any op: TF fixes its pools on first use
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    print(json.dumps(measure(parse_layers(FLAGS.layers), FLAGS.rows, FLAGS.seconds)), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
