"""Evaluates a trained model on held-out clients: the per-client accuracy distribution.

Pass the same flags (or --flagfile) as the training run:
  python -m experiments.evaluate --experiment=default              # its exported model.keras
  python -m experiments.evaluate --experiment=default --source=checkpoint
"""

import os

from absl import app, flags

from experiments import cli, flag_groups
from tffpipe import aggregation, algorithms, evaluation, experiment, outputs

flag_groups.define_all()
flags.DEFINE_enum("source", "model", ["model", "checkpoint"], "Exported model.keras, or the latest checkpoint.")
flags.DEFINE_string("model_path", None, "A .keras file to evaluate instead of the experiment's.")
flags.DEFINE_integer("max_clients", -1, "Evaluate at most this many held-out clients (-1: all).")
FLAGS = flags.FLAGS


def main(argv) -> int:
    del argv

    def evaluate() -> None:
        import tensorflow as tf

        config = flag_groups.experiment_config()
        prepared = experiment.prepare(config)
        task = prepared.task
        dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
        if FLAGS.source == "model" or FLAGS.model_path:
            path = FLAGS.model_path or dirs.model
            if not os.path.isfile(path):
                raise ValueError(f"no model at {path}; train first, or pass --model_path or --source=checkpoint")
            model = tf.keras.models.load_model(path)
            where = path
        else:
            from tffpipe import runtime

            worker = runtime.install_local_context()
            try:
                aggregator = aggregation.build_factory(prepared.dp, config.clients_per_round)
                process = algorithms.build_training_process(
                    task.learning_model(), config.algorithm, aggregator=aggregator
                )
                state, round_num = outputs.Checkpointer(dirs.checkpoints).load_latest(process.initialize())
            finally:
                worker.stop()
            if state is None:
                raise ValueError(f"no checkpoint in {dirs.checkpoints}; train first or use --source=model")
            model = task.create_keras_model()
            process.get_model_weights(state).assign_weights_to(model)
            where = f"checkpoint of round {round_num} in {dirs.checkpoints}"
        ids = sorted(task.test_data.client_ids)
        if FLAGS.max_clients > 0:
            ids = ids[: FLAGS.max_clients]
        accuracies, counts = evaluation.per_client_accuracy(model, task.test_data, ids)
        print(f"model: {where}")
        print("\n".join(evaluation.summarize(accuracies, counts).lines()))

    return cli.run_guarded(evaluate)


if __name__ == "__main__":
    app.run(main)
