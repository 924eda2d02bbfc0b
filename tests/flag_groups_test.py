"""The flag layer: one declaration per flag, defaults from the config, errors named by flag."""

import pytest
from absl import flags

from experiments import flag_groups
from tffpipe import configs


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
        (["--dp=none", "--noise_multiplier=0.5"], "--noise_multiplier=0.5: noise_multiplier=0.5 has no effect"),
        (["--compression"], "--compression: compression is not combined with DP aggregation"),
        (["--overselect=0.5"], "--overselect is a device-model flag: add --device_model, or drop --overselect"),
    ],
)
def test_an_error_names_the_one_flag_at_fault(argv, message):
    with pytest.raises(flag_groups.FlagError) as e:
        parsed(*argv)
    assert str(e.value).startswith(message)
