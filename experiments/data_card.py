"""Prints the data card of a client dataset and writes a PNG of sample characters.

python -m experiments.data_card                      # the embedded default population
python -m experiments.data_card --data_dir=~/emnist  # a real emnist_all.sqlite
"""

from absl import app, flags

from experiments import cli, flag_groups
from tffpipe import data_card
from tffpipe.data import generator

flag_groups.define_data_flags()
flags.DEFINE_string("png", "docs/samples.png", "Where to write the sample grid.")
flags.DEFINE_integer("writers", 8, "Writers (rows) in the sample grid.")
FLAGS = flags.FLAGS


def main(argv) -> int:
    del argv

    def card() -> None:
        data_dir = FLAGS.data_dir or generator.ensure_generated(
            FLAGS.cache_dir,
            generator.PopulationConfig(
                num_writers=FLAGS.num_writers,
                seed=FLAGS.data_seed,
                median_examples=FLAGS.median_examples,
                quantity_sigma=FLAGS.quantity_sigma,
                label_concentration=FLAGS.label_concentration,
            ),
        )
        print(data_card.markdown(data_card.split_statistics(data_dir)))
        data_card.write_sample_grid(data_dir, FLAGS.png, writers=FLAGS.writers)
        print(f"\nsample grid: {FLAGS.png}")

    return cli.run_guarded(card)


if __name__ == "__main__":
    app.run(main)
