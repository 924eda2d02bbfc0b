"""Trains a federated model: `python -m experiments.train --rounds=50`.

Rerunning the same command resumes from the last checkpoint; raising --rounds
extends a finished run. See README for the output layout and presets.
"""

from experiments import cli

cli.require_environment()

import sys  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import configs  # noqa: E402  (stdlib only: no TensorFlow before the flags are valid)

flag_groups.define_all()
flag_groups.define(
    "personalization",
    only=("personalize_every", "personalize_epochs", "personalize_fraction", "personalize_learning_rate"),
)
flags.DEFINE_bool("tensorboard", False, "Serve TensorBoard on 127.0.0.1 for this run's logdir while it trains.")
flags.DEFINE_bool("export", False, "When training finishes, write the TFLite files (experiments.export's defaults).")
FLAGS = flags.FLAGS


def main() -> int:
    config = flag_groups.experiment_config()
    personalize = flag_groups.personalization_config(training=config)
    stop = cli.StopSignals()
    from tffpipe import program, tensorboard_server  # TensorFlow, once the flags are known to be valid

    if FLAGS.tensorboard:
        _, url = tensorboard_server.start(f"{config.root_dir}/{config.experiment}/tensorboard")
        print(f"TensorBoard: {url}", flush=True)
    result = program.run(config, stop_requested=stop, personalize=personalize if personalize.every else None)
    if FLAGS.export and not result.stopped_early and not stop():
        manifest, out_dir = program.export_experiment(config, configs.ExportConfig())
        print(f"{manifest.table()}\n\nTFLite files in {out_dir}", flush=True)
        for failure in manifest.failures:
            print(f"error: export {failure}", file=sys.stderr)
        if manifest.failures:
            return 1
    return stop.exit_code


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["tensorboard", "export"])
