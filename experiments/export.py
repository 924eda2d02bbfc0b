"""Writes what reaches the phone: TFLite files of a trained model, their parity and a manifest.

Pass the same flags (or --flagfile) as the training run:
  python -m experiments.export --experiment=default                # its model.keras
  python -m experiments.export --experiment=default --source=checkpoint
Writes <root_dir>/<experiment>/export/ (replaced as a whole): model_float32.tflite,
model_dynamic_int8.tflite, model_full_int8.tflite, the keyboard's vocab.txt,
manifest.json and tensorboard/, and prints the manifest as a table.
"""

from experiments import cli

cli.require_environment()

import os  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import configs, validation  # noqa: E402

flag_groups.define_all()
flags.DEFINE_enum("source", "model", ["model", "checkpoint"], "Exported model.keras, or the latest checkpoint.")
flags.DEFINE_string("model_path", None, "A .keras file to export instead of the experiment's.")
flags.DEFINE_string("export_dir", None, "Where the files go; unset: <root_dir>/<experiment>/export.")
_DEFAULTS = configs.ExportConfig()
flags.DEFINE_list("variants", [v.value for v in _DEFAULTS.variants], "TFLite variants to write.")
flags.DEFINE_integer("parity_examples", _DEFAULTS.parity_examples, "Held-out examples for parity and latency.")
flags.DEFINE_integer(
    "representative_examples", _DEFAULTS.representative_examples, "Training examples calibrating full int8."
)
flags.DEFINE_integer("latency_runs", _DEFAULTS.latency_runs, "Timed one-example calls (median reported).")
FLAGS = flags.FLAGS
_OWN = ["source", "model_path", "export_dir", "variants", "parity_examples", "representative_examples", "latency_runs"]


def export_config() -> configs.ExportConfig:
    try:
        return configs.ExportConfig(
            variants=configs.export_variants(FLAGS.variants),
            parity_examples=FLAGS.parity_examples,
            representative_examples=FLAGS.representative_examples,
            latency_runs=FLAGS.latency_runs,
        )
    except validation.ConfigError as e:  # fields are named like their flags
        value = ",".join(FLAGS[e.field].value) if e.field == "variants" else FLAGS[e.field].value
        raise flag_groups.FlagError(f"--{e.field}={value}: {e}") from None


def main() -> int:
    config = flag_groups.experiment_config()
    settings = export_config()
    from tffpipe import export, outputs, program  # TensorFlow, once the flags are valid

    dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
    if FLAGS.model_path or FLAGS.source == "model":
        outputs.model_file(dirs, FLAGS.model_path)  # checked before any data is made
    if not FLAGS.export_dir and not os.path.isdir(dirs.path):
        raise flag_groups.FlagError(f"no experiment at {dirs.path} to export into; train first, or pass --export_dir")
    export.check_out_dir(FLAGS.export_dir or dirs.export)
    manifest, out_dir = program.export_experiment(
        config,
        settings,
        from_checkpoint=FLAGS.source == "checkpoint",
        model_path=FLAGS.model_path,
        out_dir=FLAGS.export_dir,
    )
    print(manifest.table())
    print(f"\nwritten to {out_dir}")
    for failure in manifest.failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if manifest.failures else 0


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=_OWN)
