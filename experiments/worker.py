"""Serves one TFF worker for tffpipe runs on other machines: `python -m experiments.worker --port=8000`.

Pass the run's data flags (--task, --data_dir or the embedded data's flags): the worker
reads the same files, at the same absolute path, when it builds client datasets; it
checks them, and prints its address and the data's fingerprint, which the training
run compares with its own before round 1.

TFF 0.87's worker service has no TLS and no authentication: whoever reaches its port
can run TensorFlow graphs with this machine's file access. It listens on 127.0.0.1 by
default, which an SSH local forward reaches (README, "Running on several machines").
--bind chooses another address: a loopback or private one is taken as given; a
wildcard or public one is refused unless --accept_unauthenticated_access is passed as
well. SIGTERM or SIGINT stops the service cleanly.
"""

from experiments import cli

cli.require_environment()

import ipaddress  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402

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


def check_bind(address: str, accepted: bool) -> None:
    """Refuses an address that is not an IP, or a wildcard or public one without the explicit flag."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise flag_groups.FlagError(f"--bind={address}: not an IP address (give one, e.g. 127.0.0.1)") from None
    if (ip.is_unspecified or ip.is_global) and not accepted:
        kind = "a wildcard" if ip.is_unspecified else "a public"
        raise flag_groups.FlagError(
            f"--bind={address}: {kind} address exposes an unauthenticated service that runs any TensorFlow graph "
            "it is sent; keep 127.0.0.1 and reach it through an SSH forward or a private network, or pass "
            "--accept_unauthenticated_access if the network is yours alone"
        )


def main() -> int:
    config = flag_groups.experiment_config()
    check_bind(FLAGS.bind, FLAGS.accept_unauthenticated_access)
    if not 0 < FLAGS.port < 65536:
        raise flag_groups.FlagError(f"--port={FLAGS.port}: must be in 1-65535")
    from tffpipe import progress, runtime, tasks

    data = tasks.data_source(config)
    data_dir = data.prepare(progress=progress.Progress().counter("data", "clients"))
    paths = data.worker_files(data_dir)
    prints = [runtime.data_fingerprint(p)[1] for p in paths]
    worker = runtime.LocalWorker(
        bind_address=FLAGS.bind,
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
    host = f"[{FLAGS.bind}]" if ":" in FLAGS.bind else FLAGS.bind
    print(f"worker serving on {host}:{FLAGS.port} (pid {worker.pid})", flush=True)
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
