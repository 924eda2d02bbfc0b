"""Prints the data card of a task's client data and writes a PNG of samples.

python -m experiments.data_card                      # the embedded default population
python -m experiments.data_card --data_dir=~/emnist  # a real emnist_all.sqlite
"""

from experiments import cli

cli.require_environment()

import os  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402

flag_groups.define("task and data")
flags.DEFINE_string("png", "docs/samples.png", "Where to write the sample grid.")
flags.DEFINE_integer("writers", 8, "Clients (rows) in the sample grid.")
FLAGS = flags.FLAGS


def main() -> int:
    config = flag_groups.experiment_config()
    if FLAGS.writers <= 0:
        raise flag_groups.FlagError(f"--writers={FLAGS.writers}: must be positive")
    directory = os.path.dirname(os.path.abspath(FLAGS.png))
    if not FLAGS.png.endswith(".png") or (os.path.exists(directory) and not os.path.isdir(directory)):
        raise flag_groups.FlagError(f"--png={FLAGS.png}: must name a .png file in a directory")
    stop = cli.StopSignals()
    from tffpipe import progress, tasks

    data = tasks.data_source(config)
    report = progress.Progress()
    data_dir = data.prepare(progress=report.counter("data", "clients"), stop_requested=stop)
    print(data.card(data_dir))
    try:
        os.makedirs(directory, exist_ok=True)
        data.write_samples(data_dir, FLAGS.png, clients=FLAGS.writers)
    except OSError as e:
        raise flag_groups.FlagError(f"--png={FLAGS.png}: cannot write it ({e.strerror or e})") from e
    print(f"\nsample grid: {FLAGS.png}")
    return stop.exit_code


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["png", "writers"])
