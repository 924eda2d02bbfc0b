"""The validated configuration of one experiment, composed of each module's own config.

Each part is the frozen, self-validating config of the module that uses it; this file
adds the cross-field checks and the flat `hparams` view written to hparams.json and
TensorBoard.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from tffpipe import accounting
from tffpipe.aggregation import DpConfig
from tffpipe.algorithms import AlgorithmConfig
from tffpipe.data.generator import PopulationConfig
from tffpipe.data.preprocessing import PreprocessConfig
from tffpipe.devices import DeviceConfig
from tffpipe.training_loop import LoopConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where client data comes from.

    Attributes:
      data_dir: directory with a real `emnist_all.sqlite`; None uses the embedded data.
      cache_dir: where the embedded data is generated once.
      only_digits: 10 digit classes instead of all 62.
      population: the embedded generator's population (ignored with data_dir).
    """

    data_dir: str | None = None
    cache_dir: str = "data_cache"
    only_digits: bool = False
    population: PopulationConfig = PopulationConfig()


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Accounting choices (the mechanism itself is `DpConfig`).

    Attributes:
      sampling: how clients are picked; None picks what the mechanism is accounted
        for: uniform without DP, Poisson for fixed/adaptive, shuffle for tree.
      delta: None gives 1 / population^1.1.
      accountant: RDP or PLD.
      target_epsilon: if set, the noise multiplier is computed to reach it.
    """

    sampling: accounting.Sampling | None = None
    delta: float | None = None
    accountant: accounting.Accountant = accounting.Accountant.RDP
    target_epsilon: float | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: str = "small_cnn"
    clients_per_round: int = 50
    eval_clients: int = 200
    seed: int = 0
    root_dir: str = "runs"
    experiment: str = "default"
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    dp: DpConfig = DpConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    loop: LoopConfig = LoopConfig(total_rounds=50)
    devices: DeviceConfig | None = None  # None: ideal, every sampled client reports
    compression: bool = False

    def __post_init__(self):
        if self.clients_per_round <= 0:
            raise ValueError(f"clients_per_round must be positive, got {self.clients_per_round}")
        if self.eval_clients < 0:
            raise ValueError(f"eval_clients must be >= 0 (0: no evaluation), got {self.eval_clients}")
        if not self.experiment or "/" in self.experiment or self.experiment in (".", ".."):
            raise ValueError(f"experiment must be a plain directory name, got {self.experiment!r}")
        if self.devices is not None and self.privacy.sampling not in (None, accounting.Sampling.DEVICE):
            raise ValueError(
                f"sampling={self.privacy.sampling.value} cannot hold under the device model, which decides "
                "participation itself; leave sampling unset"
            )
        if self.privacy.target_epsilon is not None and not self.dp.is_private:
            raise ValueError("target_epsilon needs a DP mechanism: set dp to fixed, adaptive or tree")

    @property
    def sampling(self) -> accounting.Sampling:
        if self.devices is not None:
            return accounting.Sampling.DEVICE
        if self.privacy.sampling is not None:
            return self.privacy.sampling
        return {
            accounting.Mechanism.NONE: accounting.Sampling.UNIFORM,
            accounting.Mechanism.FIXED: accounting.Sampling.POISSON,
            accounting.Mechanism.ADAPTIVE: accounting.Sampling.POISSON,
            accounting.Mechanism.TREE: accounting.Sampling.SHUFFLE,
        }[self.dp.mechanism]

    def hparams(self) -> dict[str, Any]:
        """Flat, JSON-friendly view: `section.field` keys, enums as their values."""
        flat: dict[str, Any] = {}

        def visit(prefix: str, value: Any) -> None:
            if dataclasses.is_dataclass(value):
                for field in dataclasses.fields(value):
                    visit(
                        f"{prefix}{field.name}."
                        if dataclasses.is_dataclass(getattr(value, field.name))
                        else f"{prefix}{field.name}",
                        getattr(value, field.name),
                    )
            else:
                flat[prefix] = value.value if isinstance(value, enum.Enum) else value

        visit("", self)
        flat["privacy.sampling"] = self.sampling.value
        # Loop cadences may change on resume; outputs.RESUMABLE_KEYS lists them unprefixed.
        for old, new in (
            ("loop.total_rounds", "rounds"),
            ("loop.eval_every", "eval_every"),
            ("loop.checkpoint_every", "checkpoint_every"),
        ):
            flat[new] = flat.pop(old)
        return flat
