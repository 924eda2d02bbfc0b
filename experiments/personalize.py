"""On-device personalization, evaluated: how much each held-out client gains from fine-tuning the global model.

Each held-out client's examples, in stored order, are split: the first --personalize_fraction fine-tune
the global model for --personalize_epochs with the client optimizer (SGD at
--client_learning_rate, or --personalize_learning_rate, batch --batch_size), the rest are
evaluated before and after. Pass the
training flags:
  python -m experiments.personalize --experiment=default
  python -m experiments.personalize --flagfile=experiments/presets/keyboard.flags --source=checkpoint
Prints the per-client distribution and writes <root_dir>/<experiment>/personalization.json
and a TensorBoard run (tensorboard/personalization).
"""

from experiments import cli

cli.require_environment()

import dataclasses  # noqa: E402
import os  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402

flag_groups.define_all()
flag_groups.define(
    "personalization",
    only=("personalize_epochs", "personalize_fraction", "personalize_learning_rate", "max_clients"),
)
flags.DEFINE_enum("source", "model", ["model", "checkpoint"], "Exported model.keras, or the latest checkpoint.")
# The name this binary used before it shared train's flags; refused with the new name rather than aliased, so
# a flagfile or script carries one spelling.
flags.DEFINE_string("fraction", None, "Renamed --personalize_fraction (train's name): refused, naming it.")
FLAGS = flags.FLAGS


def main() -> None:
    if FLAGS["fraction"].present:
        raise flag_groups.FlagError(
            "--fraction is now --personalize_fraction, the name train uses: "
            f"pass --personalize_fraction={FLAGS.fraction}"
        )
    config = flag_groups.experiment_config()
    settings = flag_groups.personalization_config()
    from tffpipe import evaluation, outputs, personalization, program  # TensorFlow, once the flags are valid

    dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
    if FLAGS.source == "model" and not os.path.isfile(dirs.model):
        raise flag_groups.FlagError(f"no Keras model file at {dirs.model}; train first, or pass --source=checkpoint")
    prepared = program.prepare(config, trained=dirs)  # only with the flags the run was trained with
    if FLAGS.source == "model":
        model, where = evaluation.load_keras_model(dirs.model), dirs.model
    else:
        model, where = program.restore_model(prepared, dirs)
    learning_rate = settings.learning_rate or config.algorithm.client_learning_rate
    print(
        f"model: {where}; fine-tuning: {settings.epochs} epoch(s) of SGD at {learning_rate:g}, "
        f"batch {config.preprocess.batch_size}"
    )
    outcomes = personalization.evaluate_task(
        model,
        prepared.task,
        sorted(prepared.task.test_data.client_ids),
        settings,
        client_learning_rate=config.algorithm.client_learning_rate,
        batch_size=config.preprocess.batch_size,
    )
    for summary, _ in outcomes.values():
        print("\n".join(summary.lines()))
    record = {"source": where, **dataclasses.asdict(settings), "learning_rate": learning_rate}
    record["summaries"] = {m: dataclasses.asdict(s) for m, (s, _) in outcomes.items()}
    outputs.write_json(os.path.join(dirs.path, "personalization.json"), record)
    personalization.write_tensorboard(os.path.join(dirs.tensorboard, "personalization"), outcomes)


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["source", "fraction"])
