"""Prints the data card of a task's client data and writes a PNG of samples.

python -m experiments.data_card                      # the embedded default population
python -m experiments.data_card --data_dir=~/emnist  # a real emnist_all.sqlite
python -m experiments.data_card --task=keyboard      # the keyboard data; its picture is its own PNG
"""

from experiments import cli

cli.require_environment()

import os  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import configs  # noqa: E402

# Each task's picture in the README, so one task's card never overwrites another's.
SAMPLES_PNG = {configs.Task.EMNIST: "docs/samples.png", configs.Task.KEYBOARD: "docs/keyboard_samples.png"}

flag_groups.define("task and data")
_DEFAULTS = ", ".join(f"{task.value} {path}" for task, path in SAMPLES_PNG.items())
flags.DEFINE_string("png", None, f"Where to write the sample grid; unset: the task's own ({_DEFAULTS}).")
flags.DEFINE_integer("writers", 8, "Clients (rows) in the sample grid.")
FLAGS = flags.FLAGS


def main() -> int:
    config = flag_groups.experiment_config()
    if FLAGS.writers <= 0:
        raise flag_groups.FlagError(f"--writers={FLAGS.writers}: must be positive")
    png = FLAGS.png or SAMPLES_PNG[config.task]
    directory = os.path.dirname(os.path.abspath(png))
    if not png.endswith(".png") or (os.path.exists(directory) and not os.path.isdir(directory)):
        raise flag_groups.FlagError(f"--png={png}: must name a .png file in a directory")
    stop = cli.StopSignals()
    from tffpipe import progress, tasks

    data = tasks.data_source(config)
    report = progress.Progress()
    data_dir = data.prepare(progress=report.counter("data", "clients"), stop_requested=stop)
    print(data.card(data_dir))
    try:
        os.makedirs(directory, exist_ok=True)
        data.write_samples(data_dir, png, clients=FLAGS.writers)
    except OSError as e:
        raise flag_groups.FlagError(f"--png={png}: cannot write it ({e.strerror or e})") from e
    print(f"\nsample grid: {png}")
    return stop.exit_code


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["png", "writers"])
