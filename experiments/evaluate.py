"""Evaluates a trained model on held-out clients: the per-client accuracy distribution.

Pass the same flags (or --flagfile) as the training run:
  python -m experiments.evaluate --experiment=default              # its exported model.keras
  python -m experiments.evaluate --experiment=default --source=checkpoint
"""

from experiments import cli

cli.require_environment()

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402

flag_groups.define_all()
flags.DEFINE_enum("source", "model", ["model", "checkpoint"], "Exported model.keras, or the latest checkpoint.")
flags.DEFINE_string("model_path", None, "A .keras file to evaluate instead of the experiment's.")
flags.DEFINE_integer("max_clients", -1, "Evaluate at most this many held-out clients (-1: all).")
FLAGS = flags.FLAGS


def main() -> None:
    config = flag_groups.experiment_config()
    if FLAGS.max_clients == 0 or FLAGS.max_clients < -1:
        raise flag_groups.FlagError(f"--max_clients={FLAGS.max_clients}: must be positive or -1 (all)")
    from tffpipe import evaluation, outputs, program  # TensorFlow, once the flags are known to be valid

    dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
    if FLAGS.model_path or FLAGS.source == "model":
        path = outputs.model_file(dirs, FLAGS.model_path)
    # The experiment's own model or checkpoint: only with the flags it was trained with (--model_path: any file).
    prepared = program.prepare(config, trained=None if FLAGS.model_path else dirs)
    if FLAGS.model_path or FLAGS.source == "model":
        model, where = evaluation.load_keras_model(path), path
    else:
        model, where = program.restore_model(prepared, dirs)
    ids = sorted(prepared.task.test_data.client_ids)
    if FLAGS.max_clients > 0:
        ids = ids[: FLAGS.max_clients]
    print(f"model: {where}")
    for name, (values, counts) in evaluation.per_client_metrics(model, prepared.task, ids).items():
        print("\n".join(evaluation.summarize(values, counts, name).lines()))


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["source", "model_path", "max_clients"])
