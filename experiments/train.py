"""Trains a federated model: `python -m experiments.train --rounds=50`.

Rerunning the same command resumes from the last checkpoint; raising --rounds
extends a finished run. See README for the output layout and presets.
"""

from experiments import cli

cli.require_environment()

import sys  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import configs, validation  # noqa: E402  (stdlib only: no TensorFlow before the flags are valid)

flag_groups.define_all()
flags.DEFINE_bool("tensorboard", False, "Serve TensorBoard on 127.0.0.1 for this run's logdir while it trains.")
flags.DEFINE_bool("export", False, "When training finishes, write the TFLite files (experiments.export's defaults).")
_PERSONALIZE = configs.PersonalizationConfig()
flags.DEFINE_integer(
    "personalize_every",
    _PERSONALIZE.every,
    "Fine-tune the global model on each evaluated held-out client and report the gain every N rounds "
    "(a multiple of --eval_every) and at the last; 0: never. See experiments.personalize.",
)
flags.DEFINE_integer("personalize_epochs", _PERSONALIZE.epochs, "Local epochs of fine-tuning per client.")
flags.DEFINE_float(
    "personalize_fraction", _PERSONALIZE.fraction, "Share of each client's examples (first) to fine-tune."
)
flags.DEFINE_float("personalize_learning_rate", None, "Fine-tuning SGD rate; unset: --client_learning_rate.")
FLAGS = flags.FLAGS
_FLAG_OF = {
    "every": "personalize_every",
    "epochs": "personalize_epochs",
    "fraction": "personalize_fraction",
    "learning_rate": "personalize_learning_rate",
}


def personalization_config(config: configs.ExperimentConfig) -> configs.PersonalizationConfig | None:
    """The personalization training runs (None: none), checked against the run's evaluation."""
    try:
        settings = configs.PersonalizationConfig(
            every=FLAGS.personalize_every,
            epochs=FLAGS.personalize_epochs,
            fraction=FLAGS.personalize_fraction,
            learning_rate=FLAGS.personalize_learning_rate,
        )
        settings.check_in_training(config)
    except validation.ConfigError as e:
        name = _FLAG_OF[e.field]
        raise flag_groups.FlagError(f"--{name}={FLAGS[name].value}: {e}") from None
    return settings if settings.every else None


def main() -> int:
    config = flag_groups.experiment_config()
    personalize = personalization_config(config)
    stop = cli.StopSignals()
    from tffpipe import program, tensorboard_server  # TensorFlow, once the flags are known to be valid

    if FLAGS.tensorboard:
        _, url = tensorboard_server.start(f"{config.root_dir}/{config.experiment}/tensorboard")
        print(f"TensorBoard: {url}", flush=True)
    result = program.run(config, stop_requested=stop, personalize=personalize)
    if FLAGS.export and not result.stopped_early and not stop():
        manifest, out_dir = program.export_experiment(config, configs.ExportConfig())
        print(f"{manifest.table()}\n\nTFLite files in {out_dir}", flush=True)
        for failure in manifest.failures:
            print(f"error: export {failure}", file=sys.stderr)
        if manifest.failures:
            return 1
    return stop.exit_code


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["tensorboard", "export", *_FLAG_OF.values()])
