"""Which clients take part in a round: seeded per round, so a resumed run picks the same ones."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tffpipe import configs


class ClientSampler:
    """Samples client ids for round r from (seed, r) alone, never from hidden RNG state.

    Schemes (the accountant is told which, see `configs.Sampling`):
      uniform: exactly m clients, uniformly without replacement.
      poisson: each client independently with probability q = m / N (may be empty).
      shuffle: one seeded permutation of the population, m per round, so no client
        takes part twice until all have (the participation DP-FTRL's bound assumes).
    """

    def __init__(self, client_ids: Sequence[str], clients_per_round: int, scheme: configs.Sampling, seed: int):
        if not client_ids:
            raise ValueError("client_ids must not be empty")
        if not 0 < clients_per_round <= len(client_ids):
            raise ValueError(
                f"clients_per_round must be in [1, {len(client_ids)}] (the population), got {clients_per_round}"
            )
        self._ids = np.asarray(sorted(client_ids))
        self._m = clients_per_round
        self._scheme = scheme
        self._seed = seed
        self._permutation = np.random.default_rng([seed, 0xC11E]).permutation(len(self._ids))

    @property
    def scheme(self) -> configs.Sampling:
        return self._scheme

    @property
    def population(self) -> int:
        return len(self._ids)

    def sample(self, round_num: int) -> list[str]:
        """Client ids of round `round_num` (1-based), a pure function of (seed, round)."""
        if self._scheme is configs.Sampling.SHUFFLE:
            start = ((round_num - 1) * self._m) % len(self._ids)
            picks = np.take(self._permutation, range(start, start + self._m), mode="wrap")
            return self._ids[picks].tolist()
        if self._scheme is configs.Sampling.DEVICE:
            raise ValueError("device-model participation comes from devices.DeviceRounds, not ClientSampler")
        rng = np.random.default_rng([self._seed, round_num])
        if self._scheme is configs.Sampling.POISSON:
            mask = rng.random(len(self._ids)) < self._m / len(self._ids)
            return self._ids[mask].tolist()
        return self._ids[rng.choice(len(self._ids), size=self._m, replace=False)].tolist()
