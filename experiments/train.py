"""Trains a federated model: `python -m experiments.train --rounds=50`.

Rerunning the same command resumes from the last checkpoint; raising --rounds
extends a finished run. See README for the output layout and presets.
"""

from experiments import cli

cli.require_environment()

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402

flag_groups.define_all()
flags.DEFINE_bool("tensorboard", False, "Serve TensorBoard on 127.0.0.1 for this run's logdir while it trains.")
FLAGS = flags.FLAGS


def main() -> int:
    config = flag_groups.experiment_config()
    stop = cli.StopSignals()
    from tffpipe import program, tensorboard_server  # TensorFlow, once the flags are known to be valid

    if FLAGS.tensorboard:
        _, url = tensorboard_server.start(f"{config.root_dir}/{config.experiment}/tensorboard")
        print(f"TensorBoard: {url}", flush=True)
    program.run(config, stop_requested=stop)
    return stop.exit_code


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["tensorboard"])
