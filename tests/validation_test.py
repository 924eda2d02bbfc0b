import math

import pytest

from tffpipe import validation


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_fail_every_numeric_check(value):
    for check in (validation.positive, validation.non_negative, validation.finite):
        with pytest.raises(validation.ConfigError, match="clip must be a finite number") as e:
            check(clip=value)
        assert e.value.field == "clip"
    with pytest.raises(validation.ConfigError, match="must be a finite number"):
        validation.in_range(0, 1, closed="()", delta=value)


def test_each_check_names_the_parameter_and_its_bounds():
    assert validation.positive(clip=0.5) == 0.5
    with pytest.raises(validation.ConfigError, match="clip must be positive, got 0.0"):
        validation.positive(clip=0.0)
    with pytest.raises(validation.ConfigError, match=r"delta must be in \(0, 1\), got 1"):
        validation.in_range(0, 1, closed="()", delta=1)
    assert validation.in_range(0, 24, closed="[)", hour=0.0) == 0.0
    with pytest.raises(validation.ConfigError, match=r"hour must be in \[0, 24\), got 24"):
        validation.in_range(0, 24, closed="[)", hour=24)
    with pytest.raises(validation.ConfigError, match="rounds must be >= 1, got 0"):
        validation.integer(1, rounds=0)
    with pytest.raises(validation.ConfigError, match="rounds must be a whole number, got 2.5"):
        validation.integer(1, rounds=2.5)
    with pytest.raises(validation.ConfigError, match="must be a whole number, got True"):
        validation.integer(0, seed=True)


def test_a_section_prefixes_the_field_path():
    error = validation.ConfigError("clip", "clip must be positive, got 0").prefixed("dp.")
    assert error.field == "dp.clip" and str(error) == "clip must be positive, got 0"


def test_names_and_files():
    with pytest.raises(validation.ConfigError, match="experiment must be a plain directory name"):
        validation.plain_name(experiment="..")
    assert validation.plain_name(experiment="run-1.b") == "run-1.b"


@pytest.mark.parametrize("name", ["a\nb", ".hidden", "tab\there", "a/b", ""])
def test_an_experiment_name_must_be_one_visible_printable_directory(name):
    with pytest.raises(validation.ConfigError, match="experiment must be a plain directory name") as e:
        validation.plain_name(experiment=name)
    assert e.value.field == "experiment" and "\n" not in str(e.value)


def test_files():
    with pytest.raises(validation.ConfigError, match="device_profiles: no file at /nonexistent"):
        validation.readable_file(device_profiles="/nonexistent")
