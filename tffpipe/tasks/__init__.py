"""Tasks: what clients hold and what the model predicts, behind one interface.

Each task is a sibling package (`emnist`, `keyboard`) with three sides:

* its data source (`files`), standard library only: the population size for the
  privacy plan, checking the user's files or generating the embedded data once, the
  files a worker reads and the data card, all before TensorFlow is imported;
* its learning side (`task`), TensorFlow: preprocessing, loss, metrics and samples,
  assembled into a `base.Task`;
* its serving side (`serving`): the phone model's signature, with the preprocessing
  folded in, and the files beside it (`export.ServingSpec`).

This module maps `configs.Task` to each, so nothing else branches on the task.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from tffpipe import configs
from tffpipe.tasks.emnist import files as emnist_files
from tffpipe.tasks.keyboard import files as keyboard_files

_DATA_SOURCES = {configs.Task.EMNIST: emnist_files.EmnistData, configs.Task.KEYBOARD: keyboard_files.KeyboardData}
_LEARNING_MODULES = {
    configs.Task.EMNIST: "tffpipe.tasks.emnist.task",
    configs.Task.KEYBOARD: "tffpipe.tasks.keyboard.task",
}
_SERVING_MODULES = {
    configs.Task.EMNIST: "tffpipe.tasks.emnist.serving",
    configs.Task.KEYBOARD: "tffpipe.tasks.keyboard.serving",
}


class DataSource(Protocol):
    """A task's client data: the user's files or the embedded default, one code path."""

    @property
    def is_embedded(self) -> bool: ...

    @property
    def num_classes(self) -> int: ...

    def needs_generation(self) -> bool: ...

    def population(self) -> int: ...

    def prepare(self, *, progress=None, stop_requested=lambda: False) -> str: ...

    def example_counts(self, data_dir: str) -> dict[str, int]: ...

    def worker_files(self, data_dir: str) -> list[str]: ...

    def card(self, data_dir: str) -> str: ...

    def write_samples(self, data_dir: str, png_path: str, clients: int = 8, per_client: int = 12) -> None: ...


def data_source(config: configs.ExperimentConfig) -> DataSource:
    return _DATA_SOURCES[config.task](config.data)


def create_task(config: configs.ExperimentConfig, data: DataSource, data_dir: str):
    """The task's `base.Task` over the prepared data (imports TensorFlow)."""
    module = importlib.import_module(_LEARNING_MODULES[config.task])  # TF only once a task is built
    return module.create_task(config, data, data_dir)


def serving_spec(config: configs.ExperimentConfig, data_dir: str):
    """The task's `export.ServingSpec`: what its phone model takes and how it is scored (imports TensorFlow)."""
    module = importlib.import_module(_SERVING_MODULES[config.task])
    return module.create_serving_spec(config, data_dir)
