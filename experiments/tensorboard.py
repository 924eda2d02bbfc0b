"""Serves TensorBoard on 127.0.0.1 over every experiment under --root (`make tensorboard`)."""

import os
import sys

from absl import app, flags

flags.DEFINE_string("root", "runs", "Root directory of experiments.")
flags.DEFINE_integer("port", 6006, "Port on 127.0.0.1.")
FLAGS = flags.FLAGS


def main(argv) -> int:
    del argv
    if not os.path.isdir(FLAGS.root):
        print(f"error: {FLAGS.root} does not exist yet; run `make train` first", file=sys.stderr)
        return 2
    print(f"TensorBoard for {FLAGS.root}: http://127.0.0.1:{FLAGS.port}/  (Ctrl-C stops it)", flush=True)
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            f"--logdir={FLAGS.root}",
            "--host=127.0.0.1",
            f"--port={FLAGS.port}",
        ],
    )


if __name__ == "__main__":
    app.run(main)
