"""The flag layer: one declaration per flag, defaults from the config, errors named by flag."""

import os

import pytest
from absl import flags

from experiments import flag_groups
from tffpipe import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parsed(*argv: str) -> configs.ExperimentConfig:
    """The config of `argv` through every group's flags, on a FlagValues of its own."""
    values = flags.FlagValues()
    flag_groups.define_all(values)
    values(["prog", *argv])
    return flag_groups.experiment_config(values)


def test_every_flag_sets_a_real_field_and_every_field_has_at_most_one_flag():
    paths = [f.path for group in flag_groups.GROUPS.values() for f in group if f.path]
    assert set(paths) <= set(configs.field_paths())
    assert len(paths) == len(set(paths))


def test_defaults_are_the_configs_own():
    assert parsed() == configs.ExperimentConfig()


def test_values_land_in_their_fields():
    config = parsed("--dp=adaptive", "--clients_per_round=20", "--clip=0.25", "--algorithm=fedadam", "--rounds=7")
    assert config.dp.mechanism is configs.Mechanism.ADAPTIVE and config.dp.clip == 0.25
    assert config.algorithm.server_learning_rate == pytest.approx(10**-2.5) and config.loop.rounds == 7
    mobile = parsed("--device_model", "--deadline_seconds=60")
    assert mobile.devices == configs.DeviceConfig(deadline_seconds=60.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clip=nan"], "--clip=nan: clip must be a finite number, got nan"),
        (["--num_writers=0"], "--num_writers=0: num_writers must be >= 1, got 0"),
        (["--task=keyboard", "--only_digits"], "--only_digits is a flag of the emnist task, which --task=keyboard"),
        (["--vocab_size=100"], "--vocab_size is a flag of the keyboard task, which --task=emnist does not use"),
        (["--compression"], "--compression: compression is not combined with DP aggregation"),
        (["--overselect=0.5"], "--overselect is a device-model flag: add --device_model, or drop --overselect"),
    ],
)
def test_an_error_names_the_one_flag_at_fault(argv, message):
    with pytest.raises(flag_groups.FlagError) as e:
        parsed(*argv)
    assert str(e.value).startswith(message)


def test_dp_none_overrides_a_preset_whose_dp_parameters_are_then_unused(capsys):
    preset = os.path.join(REPO, "experiments", "presets", "dp_fedavg_eps8.flags")  # sets --target_epsilon=8
    config = parsed(f"--flagfile={preset}", "--dp=none", "--noise_multiplier=0.3")
    assert config.dp.mechanism is configs.Mechanism.NONE and config.dp.given_noise_multiplier == 0.0
    assert config.privacy.target_epsilon is None
    assert capsys.readouterr().out == (
        "note: no DP mechanism (dp none), so --noise_multiplier=0.3 and --target_epsilon=8.0 are unused: "
        "no clipping, no noise\n"
    )


def test_task_defaults_are_what_an_unset_flag_resolves_to():
    keyboard = parsed("--task=keyboard")
    assert keyboard == configs.build({"task": configs.Task.KEYBOARD})  # configs_test checks those values
    assert keyboard.algorithm.algorithm is configs.Algorithm.FEDADAM and keyboard.preprocess.epochs == 1
    assert keyboard.algorithm.server_learning_rate == 0.01 and keyboard.dp.mechanism is configs.Mechanism.NONE
    assert parsed("--task=keyboard", "--epochs=3", "--dp=fixed").preprocess.epochs == 3  # a given flag wins
    emnist = parsed()
    assert (emnist.algorithm.algorithm, emnist.preprocess.epochs, emnist.dp.mechanism) == (
        configs.Algorithm.FEDAVG,
        5,
        configs.Mechanism.FIXED,
    )


def test_help_shows_each_tasks_defaults():
    values = flags.FlagValues()
    flag_groups.define_all(values)
    assert values["epochs"].default is None
    assert values["epochs"].help == "Local epochs per round. Unset: per task (emnist 5, keyboard 1)."
    assert values["dp"].help.endswith("Unset: per task (emnist fixed, keyboard none).")
    assert "fedadagrad 0.1; keyboard task: fedadam 0.01;" in values["server_learning_rate"].help


def test_distributed_dp_with_a_client_group_size_runs_per_client_with_a_note(capsys):
    config = parsed("--dp=distributed", "--client_batching=4", "--clients_per_round=10")
    assert config.client_batching == "off"  # what the run does, as recorded in hparams
    assert capsys.readouterr().out == (
        "note: client_batching=4 runs per client: distributed DP needs each real client's own clipping, rounding "
        "and noise share\n"
    )
