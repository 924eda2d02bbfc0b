"""Trains a federated model: `python -m experiments.train --rounds=50`.

Rerunning the same command resumes from the last checkpoint; raising --rounds
extends a finished run. See README for the output layout and presets.
"""

from absl import app, flags

from experiments import cli, flag_groups
from tffpipe import experiment, tensorboard

flag_groups.define_all()
flags.DEFINE_bool("tensorboard", False, "Serve TensorBoard on 127.0.0.1 for this run's logdir while it trains.")
FLAGS = flags.FLAGS


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def train() -> int:
        config = flag_groups.experiment_config()
        stop = cli.StopSignals()
        if FLAGS.tensorboard:
            _, url = tensorboard.start(f"{config.root_dir}/{config.experiment}/tensorboard")
            print(f"TensorBoard: {url}", flush=True)
        experiment.run(config, stop_requested=stop)
        return stop.exit_code

    return cli.run_guarded(train)


if __name__ == "__main__":
    app.run(main)
