"""Serves TensorBoard on 127.0.0.1 over every experiment under --root (`make tensorboard`)."""

from experiments import cli

cli.require_environment()

import errno  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402

from tffpipe import errors  # noqa: E402

flags.DEFINE_string("root", "runs", "Root directory of experiments.")
flags.DEFINE_integer("port", 6006, "Port on 127.0.0.1.")
FLAGS = flags.FLAGS


def check_port_free(port: int) -> None:
    """Refuses a port TensorBoard could not listen on, before it starts and prints its own five lines."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TensorBoard's server does
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                reason = "is already in use on 127.0.0.1 (another TensorBoard?)"
            elif e.errno == errno.EACCES:
                reason = "is below 1024, which needs root"
            else:
                reason = f"cannot be listened on at 127.0.0.1 ({e.strerror})"
            raise errors.InputError(f"--port={port}: port {port} {reason}; choose another --port") from None


def main() -> None:
    if not os.path.isdir(FLAGS.root):
        raise errors.InputError(f"--root={FLAGS.root}: no such directory yet; run `make train` first")
    if not 0 < FLAGS.port < 65536:
        raise errors.InputError(f"--port={FLAGS.port}: must be in 1-65535")
    check_port_free(FLAGS.port)
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
    cli.start(main, doc=__doc__, own_flags=["root", "port"])
