"""A mobile-style device population: availability windows, speed tiers, bandwidth, dropouts.

Production keyboard FL trains only on phones that are charging, idle and on an
unmetered network, mostly at night in the user's time zone; phones differ tenfold in
speed; some drop out mid-round; uploads cost bytes. Every client id gets a
deterministic `DeviceProfile` from the seed (or from a CSV the user supplies, e.g. made
from real traces), and `DeviceRounds` runs each round on a simulated clock:

1. only devices inside their availability window at the round's start are eligible;
2. k * (1 + overselect) of them are asked (uniformly, seeded by (seed, round));
3. each downloads the model, trains its examples x epochs at its speed scaled to the
   model (below), uploads the update; it drops out with its probability;
4. the round closes when k have reported or at the deadline; later devices and
   dropped ones contribute nothing. The clock advances by the round's duration.

Everything is a pure function of (profiles, seed, round history), so a resumed run
replays the clock exactly.

Speeds are examples/s of a model of `REFERENCE_PARAMETERS` parameters (small_cnn at 62
classes, what the tiers were set for); a model of P parameters takes P /
REFERENCE_PARAMETERS times as long per example. The parameter count stands in for the
training FLOPs per example, a first-order proxy: against small_cnn's 0.70M multiply-adds
per image, cnn (22x the parameters) does 17x, cifg_lstm (26x) 40x and so_lstm (74x) 87x
per 20-word sequence, since convolutions reuse weights over positions and LSTMs over
time steps; dense-only models (linear, mlp) reuse none, and train about 13x faster than
their parameter count says.

Profile CSV schema (one row per client, header required):
  client_id, tier, examples_per_second, upload_bytes_per_second,
  download_bytes_per_second, utc_offset_hours, window_start_hour, window_hours,
  dropout_probability
where tier is low, mid or high (participation is reported per tier), window_start_hour is
local time in [0, 24) and the window may wrap past midnight.
"""

from __future__ import annotations

import csv
import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from tffpipe import configs, validation

SECONDS_PER_HOUR = 3600.0
# Compute tiers: share of devices, and the log-uniform range of on-device training speed
# in examples/s of a model of REFERENCE_PARAMETERS (small_cnn on phone CPUs, framework
# overhead included); the tiers' medians are about 4x apart, low to high about 15x.
TIERS = {"low": (0.3, (2.0, 8.0)), "mid": (0.5, (8.0, 30.0)), "high": (0.2, (30.0, 120.0))}
REFERENCE_PARAMETERS = 54_462  # small_cnn at 62 classes; speeds scale by REFERENCE_PARAMETERS / parameters


class ProfileError(validation.ConfigError):
    """A device profile (or profile file) that cannot be used."""

    def __init__(self, message: str):
        super().__init__("devices.device_profiles", message)


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    client_id: str
    tier: str
    examples_per_second: float
    upload_bytes_per_second: float
    download_bytes_per_second: float
    utc_offset_hours: float
    window_start_hour: float
    window_hours: float
    dropout_probability: float

    def __post_init__(self):
        if self.tier not in TIERS:
            # Participation is reported per tier; an unknown one would only fail once training is done.
            raise ProfileError(f"device {self.client_id}: tier is {self.tier!r}; use one of {', '.join(TIERS)}")
        try:
            validation.positive(examples_per_second=self.examples_per_second)
            validation.positive(upload_bytes_per_second=self.upload_bytes_per_second)
            validation.positive(download_bytes_per_second=self.download_bytes_per_second)
            validation.in_range(-24, 24, utc_offset_hours=self.utc_offset_hours)
            validation.in_range(0, 24, closed="[)", window_start_hour=self.window_start_hour)
            validation.in_range(0, 24, window_hours=self.window_hours)
            validation.in_range(0, 1, dropout_probability=self.dropout_probability)
        except validation.ConfigError as e:
            raise ProfileError(f"device {self.client_id}: {e}") from None

    def available_at(self, utc_seconds: float) -> bool:
        """Inside the daily window (charging, idle, unmetered) at this UTC time."""
        if self.window_hours >= 24:
            return True
        local = (utc_seconds / SECONDS_PER_HOUR + self.utc_offset_hours) % 24
        return (local - self.window_start_hour) % 24 < self.window_hours


def create_profile(client_id: str, seed: int) -> DeviceProfile:
    """The profile of one client, from (seed, client id) alone."""
    rng = np.random.default_rng([seed, zlib.crc32(client_id.encode())])
    names = list(TIERS)
    tier = names[rng.choice(len(names), p=[TIERS[n][0] for n in names])]
    low, high = TIERS[tier][1]
    return DeviceProfile(
        client_id=client_id,
        tier=tier,
        examples_per_second=float(np.exp(rng.uniform(np.log(low), np.log(high)))),
        # Mobile uplinks: median ~5 Mbit/s, downlinks ~4x faster, both log-normal.
        upload_bytes_per_second=float(np.exp(rng.normal(np.log(625_000), 0.8))),
        download_bytes_per_second=float(np.exp(rng.normal(np.log(2_500_000), 0.8))),
        utc_offset_hours=float(rng.integers(-8, 10)),
        window_start_hour=float(rng.uniform(21.0, 26.0) % 24),  # plugged in for the night
        window_hours=float(rng.uniform(4.0, 9.0)),
        dropout_probability=float(rng.beta(1.0, 12.0)),  # mean ~8%
    )


def create_profiles(client_ids: Sequence[str], seed: int) -> dict[str, DeviceProfile]:
    return {cid: create_profile(cid, seed) for cid in client_ids}


def save_profiles(profiles: Mapping[str, DeviceProfile], path: str) -> None:
    fields = [f.name for f in dataclasses.fields(DeviceProfile)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for profile in profiles.values():
            writer.writerow(dataclasses.asdict(profile))


def load_profiles(path: str, client_ids: Sequence[str]) -> dict[str, DeviceProfile]:
    """Reads profiles (schema in the module doc); every client id must have one.

    Raises:
      ProfileError: naming the file, and the line and column at fault.
    """
    fields = [f.name for f in dataclasses.fields(DeviceProfile)]
    profiles = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(fields) - set(reader.fieldnames or [])
            if missing:
                raise ProfileError(f"device profile file {path} lacks the columns {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                values = {}
                for k in fields:
                    try:
                        values[k] = row[k] if k in ("client_id", "tier") else float(row[k])
                    except (TypeError, ValueError):
                        raise ProfileError(f"{path} line {line}: {k} is {row[k]!r}, not a number") from None
                try:
                    profiles[row["client_id"]] = DeviceProfile(**values)
                except ProfileError as e:
                    raise ProfileError(f"{path} line {line}: {e}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ProfileError(f"cannot read device profile file {path}: {e}") from e
    lacking = [cid for cid in client_ids if cid not in profiles]
    if lacking:
        raise ProfileError(f"device profile file {path} has no row for {len(lacking)} clients, e.g. {lacking[:3]}")
    return profiles


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """What happened to the devices of one round."""

    start_seconds: float
    duration_seconds: float
    available: int
    selected: tuple[str, ...]
    reported: tuple[str, ...]
    dropped: tuple[str, ...]
    late: tuple[str, ...]
    bytes_up: int
    bytes_down: int

    def metrics(self) -> dict[str, float]:
        return {
            "system/simulated_round_seconds": self.duration_seconds,
            "system/simulated_clock_hours": (self.start_seconds + self.duration_seconds) / SECONDS_PER_HOUR,
            "system/available": float(self.available),
            "system/selected": float(len(self.selected)),
            "system/reported": float(len(self.reported)),
            "system/dropped": float(len(self.dropped)),
            "system/late": float(len(self.late)),
            "system/bytes_up": float(self.bytes_up),
            "system/bytes_down": float(self.bytes_down),
        }


class DeviceRounds:
    """Client selection under the device model; `sample(r)` gives round r's reporters.

    It satisfies the training loop's sampler protocol. Outcomes are computed in round
    order from round 1 and cached, so asking for round r after a restart replays the
    simulated clock up to r without training.
    """

    def __init__(
        self,
        profiles: Mapping[str, DeviceProfile],
        examples: Mapping[str, int],
        *,
        clients_per_round: int,
        epochs: int,
        model_bytes: int,
        update_bytes: int,
        model_parameters: int,
        config: configs.DeviceConfig,
        seed: int,
    ):
        if clients_per_round <= 0:
            raise ValueError(f"clients_per_round must be positive, got {clients_per_round}")
        if model_parameters <= 0:
            raise ValueError(f"model_parameters must be positive, got {model_parameters}")
        self._ids = sorted(profiles)
        self._profiles = profiles
        self._examples = examples
        self._k = clients_per_round
        self._epochs = epochs
        self._model_bytes = model_bytes
        self._update_bytes = update_bytes
        self._compute_scale = model_parameters / REFERENCE_PARAMETERS  # seconds per example, relative
        self._config = config
        self._seed = seed
        self._outcomes: list[RoundOutcome] = []

    def outcome(self, round_num: int) -> RoundOutcome:
        while len(self._outcomes) < round_num:
            self._outcomes.append(self._simulate(len(self._outcomes) + 1))
        return self._outcomes[round_num - 1]

    def sample(self, round_num: int) -> list[str]:
        return list(self.outcome(round_num).reported)

    def _simulate(self, round_num: int) -> RoundOutcome:
        if self._outcomes:
            last = self._outcomes[-1]
            start = last.start_seconds + last.duration_seconds + self._config.server_gap_seconds
        else:
            start = self._config.start_hour_utc * SECONDS_PER_HOUR
        rng = np.random.default_rng([self._seed, 0xDE71CE, round_num])
        available = [cid for cid in self._ids if self._profiles[cid].available_at(start)]
        asked = min(len(available), int(np.ceil(self._k * (1 + self._config.overselect))))
        selected = [available[i] for i in rng.choice(len(available), size=asked, replace=False)] if asked else []
        finish, dropped = {}, []
        for cid in selected:
            p = self._profiles[cid]
            drops = rng.random() < p.dropout_probability
            seconds = (
                self._model_bytes / p.download_bytes_per_second
                + self._examples.get(cid, 0) * self._epochs * self._compute_scale / p.examples_per_second
                + self._update_bytes / p.upload_bytes_per_second
            )
            if drops:
                dropped.append(cid)
            else:
                finish[cid] = seconds
        deadline = self._config.deadline_seconds or float("inf")
        in_time = sorted((t, cid) for cid, t in finish.items() if t <= deadline)
        reported = [cid for _, cid in in_time[: self._k]]
        late = sorted(set(finish) - set(reported))  # missed the deadline, or beyond the first k
        if len(reported) == self._k:
            duration = in_time[self._k - 1][0]  # closes at the k-th report
        elif deadline != float("inf") and selected:
            duration = deadline  # too few reports: the server waited for the deadline
        else:
            duration = max(finish.values(), default=0.0)
        return RoundOutcome(
            start_seconds=start,
            duration_seconds=float(duration),
            available=len(available),
            selected=tuple(selected),
            reported=tuple(reported),
            dropped=tuple(sorted(dropped)),
            late=tuple(late),
            bytes_up=self._update_bytes * len(reported),
            bytes_down=self._model_bytes * len(selected),
        )

    def participation_by_tier(self, rounds: int) -> dict[str, dict[str, float]]:
        """Per tier: share of the population, of selections, and of reports (whose updates got in)."""
        summary = {t: {"devices": 0, "selected": 0, "reported": 0} for t in TIERS}
        for cid in self._ids:
            summary[self._profiles[cid].tier]["devices"] += 1
        for r in range(1, rounds + 1):
            o = self.outcome(r)
            for cid in o.selected:
                summary[self._profiles[cid].tier]["selected"] += 1
            for cid in o.reported:
                summary[self._profiles[cid].tier]["reported"] += 1
        for s in summary.values():
            s["report_rate"] = s["reported"] / s["selected"] if s["selected"] else 0.0
        return summary
