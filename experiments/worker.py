"""Serves one TFF worker for tffpipe runs on other machines: `python -m experiments.worker --port=8000`.

Pass the run's data flags (--task, --data_dir or the embedded data's flags): the worker
reads the same files, at the same absolute path, when it builds client datasets; it
checks them, and prints its address and the data's fingerprint, which the training
run compares with its own before round 1.

TFF 0.87's worker service has no TLS and no authentication: whoever reaches its port
can run TensorFlow graphs with this machine's file access. It listens on 127.0.0.1 by
default, which an SSH local forward reaches (README, "Running on several machines"),
and its start-up line says who can reach it. --bind chooses another address, read
after normalization (`::ffff:0.0.0.0` is the IPv4 wildcard): a loopback or private one
is taken as given; a wildcard or public one is refused unless
--accept_unauthenticated_access is passed as well. SIGTERM or SIGINT stops the service
cleanly. (The workers `experiments.train` starts for itself are not reachable this way
at all: they listen on a Unix socket only their user can open.)
"""

from experiments import cli

cli.require_environment()

import errno  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import network  # noqa: E402

flag_groups.define("task and data")
flags.DEFINE_integer("port", 8000, "Port to serve on.")
flags.DEFINE_string("bind", "127.0.0.1", "Address to listen on (loopback by default; see the module doc).")
flags.DEFINE_bool(
    "accept_unauthenticated_access",
    False,
    "Allow a wildcard or public --bind although anyone reaching the port can run code here.",
)
flags.DEFINE_integer("max_concurrent_calls", -1, "Computation calls served at once (-1: no limit).")
FLAGS = flags.FLAGS


def check_bind(address: str, accepted: bool) -> network.IPAddress:
    """The normalized --bind address; a wildcard or public one only with the explicit flag."""
    try:
        return network.check_bind(address, accept_unauthenticated_access=accepted)
    except ValueError as e:
        raise flag_groups.FlagError(f"--bind={address}: {e}") from None


def check_port_free(address: network.IPAddress, port: int) -> None:
    """Refuses a port in use or an address this host does not have, before anything starts."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        try:
            probe.bind((str(address), port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise flag_groups.FlagError(
                    f"--port={port}: port {port} is already in use on {address}; choose another --port"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise flag_groups.FlagError(
                    f"--bind={address}: this host has no such address; give one of its own (`ip addr` lists them)"
                ) from None
            if e.errno == errno.EACCES:
                raise flag_groups.FlagError(f"--port={port}: ports below 1024 need root; choose one >= 1024") from None
            raise flag_groups.FlagError(f"--bind={address} --port={port}: cannot listen there ({e.strerror})") from None


def main() -> int:
    config = flag_groups.experiment_config()
    address = check_bind(FLAGS.bind, FLAGS.accept_unauthenticated_access)
    if not 0 < FLAGS.port < 65536:
        raise flag_groups.FlagError(f"--port={FLAGS.port}: must be in 1-65535")
    if FLAGS.max_concurrent_calls == 0 or FLAGS.max_concurrent_calls < -1:
        raise flag_groups.FlagError(
            f"--max_concurrent_calls={FLAGS.max_concurrent_calls}: must be -1 (no limit) or a positive number"
        )
    check_port_free(address, FLAGS.port)
    from tffpipe import progress, runtime, tasks

    data = tasks.data_source(config)
    data_dir = data.prepare(progress=progress.Progress().counter("data", "clients"))
    paths = data.worker_files(data_dir)
    prints = [runtime.data_fingerprint(p)[1] for p in paths]
    worker = runtime.LocalWorker(
        bind_address=str(address),
        port=FLAGS.port,
        max_concurrent_computation_calls=FLAGS.max_concurrent_calls,
        log_path="/dev/stderr",  # the service's own messages, beside this binary's
    )
    stopped = threading.Event()
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.start()
    endpoint = network.Endpoint(str(address), FLAGS.port)
    print(
        f"worker serving on {endpoint} (pid {worker.pid}), without authentication; reachable by "
        f"{network.exposure(address).value}",
        flush=True,
    )
    for path, value in zip(paths, prints, strict=True):
        print(f"data {path}: fingerprint {runtime.fingerprint_text(value)}", flush=True)
    while not stopped.wait(1.0):
        if not worker.alive():
            worker.stop()
            raise runtime.WorkerFault(f"the worker service on port {FLAGS.port} exited; see its output above")
    worker.stop()
    print(f"{signal.Signals(received[0]).name} received: worker stopped", flush=True)
    return 0


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["port", "bind", "accept_unauthenticated_access", "max_concurrent_calls"])
