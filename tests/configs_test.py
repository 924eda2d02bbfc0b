"""The configuration: defaults resolved once, every rule in one place, and no TensorFlow."""

import functools
import math
import subprocess
import sys

import pytest

from tffpipe import configs, validation

M, S = configs.Mechanism, configs.Sampling


def test_importing_configs_loads_no_tensorflow_or_numpy():
    code = "import sys, tffpipe.configs; print(sorted(m for m in ('tensorflow', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_defaults_that_depend_on_another_choice_are_resolved():
    assert configs.AlgorithmConfig().server_learning_rate == 1.0
    # Reddi et al. 2021's best server rate for FedAdam on EMNIST: 10^-2.5.
    assert configs.AlgorithmConfig(configs.Algorithm.FEDADAM).server_learning_rate == pytest.approx(0.0031623, rel=1e-4)
    assert configs.AlgorithmConfig(configs.Algorithm.FEDADAM, server_learning_rate=0.1).server_learning_rate == 0.1
    assert configs.DpConfig().given_noise_multiplier == 0.7
    assert configs.DpConfig(M.NONE).given_noise_multiplier == 0.0
    assert configs.ExperimentConfig().model == "small_cnn"


@pytest.mark.parametrize(
    "build, field, message",
    [
        (lambda: configs.ExperimentConfig(compression=True), "compression", "not combined with DP aggregation"),
        (
            lambda: configs.ExperimentConfig(privacy=configs.PrivacyConfig(sampling=S.DEVICE)),
            "privacy.sampling",
            "sampling=device describes the device model",
        ),
        (
            lambda: configs.ExperimentConfig(devices=configs.DeviceConfig(), dp=configs.DpConfig(M.TREE)),
            "dp.mechanism",
            "device model cannot promise",
        ),
        (
            lambda: configs.ExperimentConfig(dp=configs.DpConfig(M.TREE), privacy=configs.PrivacyConfig(S.POISSON)),
            "privacy.sampling",
            r"take part at most once \(sampling=shuffle\); got sampling=poisson",
        ),
        (
            lambda: configs.ExperimentConfig(
                privacy=configs.PrivacyConfig(S.UNIFORM, accountant=configs.Accountant.PLD)
            ),
            "privacy.accountant",
            "PLD accountant does not support sampling=uniform",
        ),
        (
            lambda: configs.ExperimentConfig(
                dp=configs.DpConfig(noise_multiplier=1.0), privacy=configs.PrivacyConfig(target_epsilon=1)
            ),
            "dp.noise_multiplier",
            "give noise_multiplier or target_epsilon, not both",
        ),
        (
            lambda: configs.ExperimentConfig(dp=configs.DpConfig(M.ADAPTIVE, 1.0), clients_per_round=10),
            "clients_per_round",
            "needs at least 11 clients per round",
        ),
        (
            lambda: configs.ExperimentConfig(algorithm=configs.AlgorithmConfig(configs.Algorithm.FEDSGD)),
            "algorithm.algorithm",
            "fedsgd takes only weighted aggregators",
        ),
    ],
)
def test_rules_that_span_sections_name_the_parameter_to_change(build, field, message):
    with pytest.raises(validation.ConfigError, match=message) as e:
        build()
    assert e.value.field == field


def test_without_dp_the_dp_parameters_given_are_unused_not_refused():
    # What `--flagfile=<a DP preset> --dp=none` gives: the preset's noise and target are dropped.
    config = configs.ExperimentConfig(
        dp=configs.DpConfig(M.NONE, noise_multiplier=1.0), privacy=configs.PrivacyConfig(target_epsilon=8.0)
    )
    assert config.unused_dp_parameters == ("dp.noise_multiplier", "privacy.target_epsilon")
    assert config.dp.noise_multiplier is None and config.privacy.target_epsilon is None
    assert config.dp.given_noise_multiplier == 0.0 and config.hparams()["privacy.target_epsilon"] is None
    assert configs.ExperimentConfig(dp=configs.DpConfig(M.NONE, noise_multiplier=0.0)).unused_dp_parameters == ()
    assert configs.ExperimentConfig(dp=configs.DpConfig(M.FIXED, 1.0)).unused_dp_parameters == ()
    # A budget is not a parameter of the mechanism: without DP it would never bind, so it is refused.
    with pytest.raises(validation.ConfigError, match="max_epsilon needs a DP mechanism"):
        configs.ExperimentConfig(dp=configs.DpConfig(M.NONE), privacy=configs.PrivacyConfig(max_epsilon=3.0))


def test_each_task_has_its_defaults_for_what_is_left_unset():
    # EMNIST's are the dataclass defaults, so a config built field by field gets them too.
    assert configs.build({}) == configs.ExperimentConfig()
    for path, by_task in configs.TASK_DEFAULTS.items():
        assert configs.default(path) == by_task[configs.Task.EMNIST], path
    # The keyboard preset's settings (experiments/presets/keyboard.flags), without DP.
    keyboard = configs.build({"task": configs.Task.KEYBOARD})
    assert keyboard.algorithm == configs.AlgorithmConfig(
        configs.Algorithm.FEDADAM, client_learning_rate=10**-0.5, server_learning_rate=0.01, adaptive_epsilon=1e-5
    )
    assert (keyboard.preprocess.epochs, keyboard.preprocess.batch_size, keyboard.clients_per_round) == (1, 16, 20)
    assert keyboard.dp.mechanism is M.NONE and keyboard.model == "cifg_lstm"
    # What is given wins; another algorithm on the keyboard task keeps its own server rate.
    given = configs.build(
        {"task": configs.Task.KEYBOARD, "preprocess.epochs": 5, "algorithm.algorithm": configs.Algorithm.FEDYOGI}
    )
    assert given.preprocess.epochs == 5 and given.algorithm.server_learning_rate == pytest.approx(10**-2.5)


def test_every_field_belongs_to_every_task_or_to_one():
    assert configs.task_of("data.only_digits") is configs.Task.EMNIST
    assert configs.task_of("data.population.num_writers") is configs.Task.EMNIST
    assert configs.task_of("data.text.population.num_users") is configs.Task.KEYBOARD
    assert configs.task_of("data.cache_dir") is None and configs.task_of("loop.rounds") is None


def test_build_assembles_sections_from_paths_and_names_the_path_at_fault():
    config = configs.build({"dp.clip": 2.0, "data.population.num_writers": 40, "loop.rounds": 7})
    assert config.dp.clip == 2.0 and config.data.population.num_writers == 40 and config.loop.rounds == 7
    assert config.devices is None
    with pytest.raises(validation.ConfigError) as e:
        configs.build({"data.population.quantity_sigma": math.nan})
    assert e.value.field == "data.population.quantity_sigma"
    with pytest.raises(validation.ConfigError) as e:
        configs.build({"devices.start_hour_utc": 99.0}, devices=True)
    assert e.value.field == "devices.start_hour_utc" and "[0, 24)" in str(e.value)


def test_every_field_has_a_path_and_its_default_is_what_build_uses():
    paths = configs.field_paths()
    assert "dp.clip" in paths and "data.population.seed" in paths and "devices.deadline_seconds" in paths
    built = configs.build({}, devices=True)  # every field left to its default
    resolved_later = set()
    for path in paths:
        value = functools.reduce(getattr, path.split("."), built)
        if configs.default(path) is None and value is not None:
            resolved_later.add(path)
        else:
            assert configs.default(path) == value, path
    # None as a default means "decided by another field": the model by the task, the server rate by the algorithm.
    assert resolved_later == {"model", "algorithm.server_learning_rate"}


def test_hparams_are_flat_and_the_resumable_keys_come_from_the_fields():
    flat = configs.ExperimentConfig().hparams()
    assert flat["dp.mechanism"] == "fixed" and flat["privacy.sampling"] == "poisson" and flat["loop.rounds"] == 50
    assert configs.resumable_keys() == {
        "loop.rounds",
        "loop.eval_every",
        "loop.checkpoint_every",
        "root_dir",
        "experiment",
        "data.cache_dir",
        "privacy.max_epsilon",
        "runtime.workers",
        "runtime.local_workers",
        "runtime.pin_workers",
        "runtime.worker_retries",
    }


@pytest.mark.parametrize(
    "values, field, message",
    [
        # 1 GB = 10^9 bytes of memory in these cases.
        # 1,000,000 canaries x 1,024 bytes = 1.024 GB.
        ({"privacy.canaries": 10**6}, "privacy.canaries", "canaries=1000000 needs at least 1.0 GB of memory"),
        # (10^7 + 1 + 3) ids x 3,104 bytes (8 copies of 97 float32) = 31 GB.
        (
            {"task": configs.Task.KEYBOARD, "data.text.vocab_size": 10**7},
            "data.text.vocab_size",
            "vocab_size=10000000 needs at least 31.0 GB of memory (10,000,004 x 3,104 bytes",
        ),
        # The larger of vocabulary and buckets is named: 10,000 + 2*10^6 + 3 ids x 3,104 bytes = 6.2 GB.
        (
            {"task": configs.Task.KEYBOARD, "data.text.num_oov_buckets": 2 * 10**6},
            "data.text.num_oov_buckets",
            "num_oov_buckets=2000000 needs at least 6.2 GB",
        ),
        # 2,000 positions x 10,004 ids x 100 sequences x 4 bytes = 8.0 GB.
        (
            {"task": configs.Task.KEYBOARD, "data.text.sequence_length": 2000},
            "data.text.sequence_length",
            "sequence_length=2000 needs at least 8.0 GB",
        ),
        ({"data.population.num_writers": 10**6}, "data.population.num_writers", "num_writers=1000000 needs"),
        (
            {"preprocess.shuffle_buffer": 10**8},
            "preprocess.shuffle_buffer",
            "shuffle_buffer=100000000 needs at least 6.4",
        ),
    ],
)
def test_a_size_that_cannot_fit_in_memory_is_refused_naming_it(monkeypatch, values, field, message):
    monkeypatch.setattr(configs, "memory_bytes", lambda: 10**9)
    with pytest.raises(validation.ConfigError, match=message.replace("(", r"\(")) as e:
        configs.build(values)
    assert e.value.field == field and "more than this machine's 1.0 GB" in str(e.value)


def test_sizes_within_memory_and_the_embedded_population_of_another_task_pass(monkeypatch):
    monkeypatch.setattr(configs, "memory_bytes", lambda: 10**9)
    configs.build({"task": configs.Task.KEYBOARD, "data.text.sequence_length": 200})  # 0.8 GB of logits
    configs.build({"data.text.vocab_size": 10**7})  # an EMNIST run builds no vocabulary
    configs.build({"data.population.num_writers": 10**6, "data.data_dir": "/data"})  # nothing generated
    monkeypatch.setattr(configs, "memory_bytes", lambda: 0)  # unknown memory: nothing is bounded
    configs.build({"privacy.canaries": 10**9})


def test_memory_is_this_machines():
    import os

    assert configs.memory_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert configs.memory_bytes() > 2**28  # more than 256 MiB: the bounds are real


@pytest.mark.parametrize(
    "build, field, message",
    [
        (lambda: configs.DpConfig(M.DISTRIBUTED, bits=0), "bits", "bits must be >= 1, got 0"),
        (lambda: configs.DpConfig(M.DISTRIBUTED, bits=63), "bits", "bits must be an integer from 1 to 22, got 63"),
        (lambda: configs.DpConfig(M.DISTRIBUTED, bits=16.5), "bits", "bits must be a whole number, got 16.5"),
        (lambda: configs.DpConfig(M.FIXED, bits=16), "bits", "has no effect with mechanism fixed"),
        (
            lambda: configs.ExperimentConfig(dp=configs.DpConfig(M.DISTRIBUTED), compression=True),
            "compression",
            "not combined with the distributed mechanism: it already quantizes each update to bits=20",
        ),
        (
            lambda: configs.ExperimentConfig(
                dp=configs.DpConfig(M.DISTRIBUTED), privacy=configs.PrivacyConfig(S.UNIFORM)
            ),
            "privacy.sampling",
            "accounted under Poisson sampling",
        ),
        (
            lambda: configs.ExperimentConfig(
                dp=configs.DpConfig(M.DISTRIBUTED), privacy=configs.PrivacyConfig(accountant=configs.Accountant.PLD)
            ),
            "privacy.accountant",
            "use the RDP accountant",
        ),
        (
            lambda: configs.ExperimentConfig(dp=configs.DpConfig(M.DISTRIBUTED, zeroing_norm=1.0)),
            "dp.zeroing_norm",
            "zeroing is not wired into the distributed mechanism",
        ),
        (
            lambda: configs.ExperimentConfig(secure_aggregation=True),  # with the default fixed mechanism
            "secure_aggregation",
            "secure sum without DP and is not combined with mechanism fixed",
        ),
        (
            lambda: configs.ExperimentConfig(dp=configs.DpConfig(M.DISTRIBUTED), secure_aggregation=True),
            "secure_aggregation",
            "not combined with mechanism distributed; use it with mechanism none",
        ),
        (
            lambda: configs.ExperimentConfig(dp=configs.DpConfig(M.NONE), secure_aggregation=True, compression=True),
            "secure_aggregation",
            "not combined with compression",
        ),
    ],
)
def test_distributed_bits_and_combinations_are_checked_naming_the_parameter(build, field, message):
    with pytest.raises(validation.ConfigError, match=message) as e:
        build()
    assert e.value.field == field


def test_distributed_defaults_to_20_bits_and_poisson_sampling():
    config = configs.ExperimentConfig(dp=configs.DpConfig(M.DISTRIBUTED))
    assert config.dp.bits == 20 and config.sampling is S.POISSON
    assert configs.DpConfig(M.FIXED).bits is None  # the field width means nothing to central DP
    assert (
        configs.ExperimentConfig(dp=configs.DpConfig(M.DISTRIBUTED), devices=configs.DeviceConfig()).sampling
        is S.DEVICE
    )


def test_distributed_dp_and_secure_aggregation_fall_back_to_per_client_rounds():
    distributed = configs.ExperimentConfig(dp=configs.DpConfig(M.DISTRIBUTED), client_batching="5")
    secure = configs.ExperimentConfig(dp=configs.DpConfig(M.NONE), secure_aggregation=True, client_batching="5")
    for config in (distributed, secure):
        assert config.client_batching == "off" and config.client_batching_fallback.startswith("client_batching=5 runs")
    assert "secure aggregation sums each real client's own update" in secure.client_batching_fallback
    assert configs.ExperimentConfig(dp=configs.DpConfig(M.FIXED), client_batching="5").client_batching == "5"
    assert configs.ExperimentConfig(dp=configs.DpConfig(M.FIXED), client_batching="5").client_batching_fallback is None


def test_distributed_noise_defaults_to_the_discrete_gaussian_and_belongs_to_the_distributed_mechanism():
    assert configs.DpConfig(M.DISTRIBUTED).distributed_noise is configs.DistributedNoise.DISCRETE_GAUSSIAN
    assert configs.DpConfig(M.FIXED).distributed_noise is None
    with pytest.raises(validation.ConfigError, match="distributed_noise=skellam is the distributed mechanism's noise"):
        configs.DpConfig(M.FIXED, distributed_noise=configs.DistributedNoise.SKELLAM)
    dropped = configs.ExperimentConfig(dp=configs.DpConfig(M.NONE, distributed_noise=configs.DistributedNoise.SKELLAM))
    assert dropped.dp.distributed_noise is None and dropped.unused_dp_parameters == ("dp.distributed_noise",)
