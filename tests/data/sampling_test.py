import numpy as np
import pytest

from tffpipe import configs
from tffpipe.data import sampling

IDS = [f"c{i:03d}" for i in range(100)]


def test_same_round_gives_same_clients_whatever_was_sampled_before():
    a = sampling.ClientSampler(IDS, 10, configs.Sampling.UNIFORM, seed=5)
    b = sampling.ClientSampler(IDS, 10, configs.Sampling.UNIFORM, seed=5)
    a.sample(1), a.sample(2)
    assert a.sample(3) == b.sample(3)
    assert a.sample(3) != a.sample(4)


def test_uniform_draws_exactly_m_distinct_clients():
    s = sampling.ClientSampler(IDS, 10, configs.Sampling.UNIFORM, seed=0)
    for r in range(1, 20):
        picked = s.sample(r)
        assert len(picked) == 10 == len(set(picked))


def test_poisson_round_sizes_have_mean_m():
    s = sampling.ClientSampler(IDS, 10, configs.Sampling.POISSON, seed=0)
    sizes = [len(s.sample(r)) for r in range(1, 401)]
    # Binomial(100, 0.1): mean 10, std 3; the mean of 400 rounds is within 10 +- 0.5 (3.3 sigma).
    assert abs(np.mean(sizes) - 10) < 0.5
    assert np.std(sizes) > 2


def test_shuffle_uses_every_client_once_before_any_repeats():
    s = sampling.ClientSampler(IDS, 10, configs.Sampling.SHUFFLE, seed=0)
    epoch = [c for r in range(1, 11) for c in s.sample(r)]
    assert sorted(epoch) == sorted(IDS)


def test_bad_clients_per_round_names_the_population():
    with pytest.raises(ValueError, match=r"clients_per_round must be in \[1, 100\]"):
        sampling.ClientSampler(IDS, 101, configs.Sampling.UNIFORM, seed=0)
