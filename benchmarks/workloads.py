"""The benchmark workloads: a population and a model each, the same for every benchmark.

`benchmarks.run` times a workload's rounds in one process (`config`), `benchmarks.wall`
times the training binary from outside (`train_flags`); each has its own round counts.
The EMNIST populations have equal writers (quantity_sigma 0) from data seed 42; 10% of
each writer's examples are held out for evaluation.
"""

from __future__ import annotations

import dataclasses

from tffpipe import configs


@dataclasses.dataclass(frozen=True)
class Workload:
    """One population and model, with the rounds each benchmark runs of it.

    Attributes:
      num_writers, median_examples: the EMNIST population (0: the task's default population).
      rounds, quick_rounds: rounds `benchmarks.run` times (and with --quick), after a warm-up round.
      wall_rounds: rounds of the training binary `benchmarks.wall` runs.
    """

    name: str
    model: str
    clients_per_round: int
    num_writers: int
    median_examples: int
    rounds: int
    quick_rounds: int
    wall_rounds: int
    task: configs.Task = configs.Task.EMNIST
    batch_size: int = 20
    epochs: int = 1
    default_run: bool = False  # the experiment `make train` runs, as it is (the fields above describe it)

    def population(self) -> dict[str, object]:
        """The population's configuration paths (none: the task's default population)."""
        if not self.num_writers:
            return {}
        return {
            "data.population.num_writers": self.num_writers,
            "data.population.median_examples": self.median_examples,
            "data.population.quantity_sigma": 0.0,
            "data.population.seed": 42,
        }

    def config(self, cache_dir: str) -> configs.ExperimentConfig:
        """The experiment `train` would run: FedAvg (client SGD 0.05), no DP, no shuffling.

        With `default_run`, `train`'s defaults instead (small_cnn, 5 epochs, fixed-clip DP,
        Poisson sampling), only the cache directory set.
        """
        if self.default_run:
            return configs.build({"data.cache_dir": cache_dir})
        return configs.build(
            {
                "task": self.task,
                "model": self.model,
                "clients_per_round": self.clients_per_round,
                "data.cache_dir": cache_dir,
                "preprocess.epochs": self.epochs,
                "preprocess.batch_size": self.batch_size,
                "preprocess.shuffle_buffer": 1,
                "algorithm.client_learning_rate": 0.05,
                "dp.mechanism": configs.Mechanism.NONE,
                **self.population(),
            }
        )

    def train_flags(self, cache_dir: str) -> list[str]:
        """The same experiment as flags of `experiments.train`, evaluated once, at its last round."""
        last = [f"--eval_every={self.wall_rounds}", "--eval_clients=20", f"--rounds={self.wall_rounds}"]
        if self.default_run:
            return [*last, f"--cache_dir={cache_dir}"]
        population = {
            "data.population.num_writers": "num_writers",
            "data.population.median_examples": "median_examples",
            "data.population.quantity_sigma": "quantity_sigma",
            "data.population.seed": "data_seed",
        }
        return [
            f"--task={self.task.value}",
            f"--model={self.model}",
            f"--clients_per_round={self.clients_per_round}",
            *(f"--{population[path]}={value}" for path, value in self.population().items()),
            f"--epochs={self.epochs}",
            f"--batch_size={self.batch_size}",
            "--shuffle_buffer=1",
            "--client_learning_rate=0.05",
            "--dp=none",
            *last,
            f"--cache_dir={cache_dir}",
        ]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"task": self.task.value}


WORKLOADS = {
    w.name: w
    for w in (
        Workload("w1", "cnn", 10, 200, 334, 8, 4, 8),  # ~300 train examples per client
        Workload("w2", "mlp", 100, 1000, 56, 8, 4, 15),  # ~50 per client
        Workload("w3", "linear", 1000, 10_000, 22, 5, 3, 6),  # ~20 per client
        Workload("w3_2k", "linear", 1000, 2_000, 22, 5, 3, 6),  # W3 on a 5x smaller population
        Workload("fixed", "linear", 10, 200, 22, 30, 10, 30),  # ~20 per client
        Workload("w1e5", "cnn", 10, 200, 334, 6, 3, 6, epochs=5),  # W1 with 5 local epochs: 5x the work per round
        # The keyboard task's default population (1,000 users, median 60 messages), its phone-sized model.
        Workload("keyboard", "cifg_lstm", 10, 0, 0, 6, 3, 6, configs.Task.KEYBOARD, batch_size=16),
        # `make train` as it is: small_cnn, 50 writers per round (Poisson) of 3,400, 5 epochs, fixed-clip DP.
        Workload("default", "small_cnn", 50, 0, 0, 3, 2, 6, epochs=5, default_run=True),
    )
}
