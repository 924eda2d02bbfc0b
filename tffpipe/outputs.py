"""One output layout for every experiment, written through TFF's program managers.

<root>/<experiment>/
  hparams.json        the configuration; a rerun must match it to resume (once a round completed)
  checkpoints/        tff.program.FileProgramStateManager, one version per round
  metrics.csv         tff.program.CSVFileReleaseManager, keyed by `round`
  tensorboard/        scalars (TensorBoardReleaseManager), hparams, sample images
  model.keras         the final model (Keras format)
  summary.png         accuracy and epsilon over rounds
  worker.log          the TFF worker's own output
  audit.json          with canaries: their cosines and the empirical epsilon
  export/             TFLite files and their manifest (`experiments.export`, `export`)
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import configs, errors

_TB_COMMITTED = ".tensorboard_round"
_LOCK = ".lock"
_CHECKPOINT_PREFIX = "program_state_"
_CHECKPOINT_TEMP = re.compile(rf"^{_CHECKPOINT_PREFIX}\d+_temp\d+$")  # TFF's half-written checkpoint


_loops = threading.local()


def _run(coroutine):
    """Runs a tff.program manager's coroutine on this thread's own event loop.

    `asyncio.run` makes and closes a loop per call, which was most of the cost of
    releasing a round's metrics (about 4 of 5 ms); the loop and the thread it belongs
    to live as long as the process.
    """
    loop = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coroutine)


class OutputError(errors.InputError):
    """The experiment directory cannot be used as asked; nothing in it was changed."""

    field = "experiment"


class WriteFault(errors.Fault):
    """Writing an output failed mid-run (disk full, permissions); earlier outputs are intact."""


@dataclasses.dataclass(frozen=True)
class ExperimentDirs:
    """The paths of one experiment's outputs (see the module doc)."""

    root: str
    name: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.name)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def hparams(self) -> str:
        return self._file("hparams.json")

    @property
    def checkpoints(self) -> str:
        return self._file("checkpoints")

    @property
    def metrics_csv(self) -> str:
        return self._file("metrics.csv")

    @property
    def tensorboard(self) -> str:
        return self._file("tensorboard")

    @property
    def model(self) -> str:
        return self._file("model.keras")

    @property
    def summary_png(self) -> str:
        return self._file("summary.png")

    @property
    def device_participation(self) -> str:
        return self._file("device_participation.json")

    @property
    def audit(self) -> str:
        return self._file("audit.json")

    @property
    def export(self) -> str:
        return self._file("export")


def has_completed_round(dirs: ExperimentDirs) -> bool:
    """Whether a checkpoint exists: only then does the directory hold a configuration."""
    if not os.path.isdir(dirs.checkpoints):
        return False
    return any(
        name.startswith(_CHECKPOINT_PREFIX) and name[len(_CHECKPOINT_PREFIX) :].isdigit()
        for name in os.listdir(dirs.checkpoints)
    )


def last_checkpointed_round(dirs: ExperimentDirs) -> int:
    """The round of the newest complete checkpoint (0: none), from the directory names alone."""
    if not os.path.isdir(dirs.checkpoints):
        return 0
    rounds = [
        int(name[len(_CHECKPOINT_PREFIX) :])
        for name in os.listdir(dirs.checkpoints)
        if name.startswith(_CHECKPOINT_PREFIX) and name[len(_CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(rounds, default=0)


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """hparams keys whose values differ, ignoring what may change on resume.

    Keys one side lacks are tolerated where that is a version change, not a new
    configuration: a key this version no longer has, or a new key at its default.
    """
    defaults = configs.ExperimentConfig().hparams()
    resumable = configs.resumable_keys()
    changed = []
    for key in sorted(set(saved) | set(current)):
        if key in resumable or key not in current:
            continue
        if key not in saved and key in defaults and current[key] == defaults[key]:
            continue
        if saved.get(key) != current[key]:
            changed.append(key)
    return changed


def prepare(dirs: ExperimentDirs, hparams: Mapping[str, Any]) -> bool:
    """Creates the directory, or checks a rerun matches it; returns True when resuming.

    A directory whose run never completed a round holds no configuration: it is
    started afresh (its uncommitted metrics and TensorBoard files go). Holds the
    experiment's lock from here to the end of the process.

    Raises:
      OutputError: the directory holds another configuration (it is never
        overwritten), files that are not an experiment, is used by another run, or
        cannot be written.
    """
    try:
        os.makedirs(dirs.path, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the experiment directory {dirs.path}: {e.strerror or e}. Choose a writable root_dir."
        ) from e
    if not os.access(dirs.path, os.W_OK):
        raise OutputError(f"experiment directory {dirs.path} is not writable. Choose a writable root_dir.")
    entries = set(os.listdir(dirs.path)) - {_LOCK}
    if entries and not os.path.exists(dirs.hparams):
        raise OutputError(
            f"{dirs.path} already holds files but no hparams.json: not a tffpipe experiment. "
            "It is left as is; pick another experiment name or root_dir."
        )
    _lock(dirs)
    if os.path.exists(dirs.hparams) and has_completed_round(dirs):
        details = _configuration_changes(dirs, hparams)
        if details:
            raise OutputError(
                f"experiment {dirs.path} was run with another configuration ({details}). Its checkpoints "
                "are kept untouched: pick a new experiment name, or rerun with the original settings to resume."
            )
        remove_stale_checkpoint_files(dirs)
        return True
    for stale in (dirs.metrics_csv, dirs.tensorboard, dirs.checkpoints):  # a run that never completed a round
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.exists(stale):
            os.remove(stale)
    write_json(dirs.hparams, hparams)
    return False


def model_file(dirs: ExperimentDirs, model_path: str | None = None) -> str:
    """The .keras file a reader loads: `model_path`, or the experiment's exported model.

    Raises:
      OutputError: there is no such .keras file.
    """
    path = model_path or dirs.model
    if not path.endswith(".keras") or not os.path.isfile(path):
        raise OutputError(
            f"no Keras model file at {path}; train first, or pass --model_path=<file.keras> or --source=checkpoint"
        )
    return path


def check_trained_with(dirs: ExperimentDirs, hparams: Mapping[str, Any]) -> None:
    """For reading a run's outputs (evaluate): it completed a round, with this configuration. Writes nothing.

    Raises:
      OutputError: no checkpoint (never trained, or no such experiment), or another configuration.
    """
    if not has_completed_round(dirs) or not os.path.exists(dirs.hparams):
        raise OutputError(f"experiment {dirs.path} has not completed a round (no checkpoint); train it first")
    details = _configuration_changes(dirs, hparams)
    if details:
        raise OutputError(
            f"experiment {dirs.path} was trained with another configuration ({details}); "
            "give the flags (or --flagfile) it was trained with"
        )


def _configuration_changes(dirs: ExperimentDirs, hparams: Mapping[str, Any]) -> str:
    """`key: saved -> current` for each setting that differs from the run's hparams.json ('' when none)."""
    try:
        with open(dirs.hparams) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise OutputError(
            f"{dirs.hparams} is unreadable ({e}); move the directory away or pick another experiment name"
        ) from e
    changed = changed_keys(saved, hparams)
    if "task" in changed:
        changed = ["task"]  # each task's own settings differ with it; the task is what to fix
    return ", ".join(f"{k}: {saved.get(k)!r} -> {hparams.get(k)!r}" for k in changed)


_held_locks: dict[str, IO[str]] = {}


def _lock(dirs: ExperimentDirs) -> None:
    """An exclusive lock on the experiment for this process's lifetime (released by the kernel on exit)."""
    path = os.path.abspath(os.path.join(dirs.path, _LOCK))
    if path in _held_locks:
        return
    handle = open(path, "a")  # noqa: SIM115  (held until the process exits)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.close()
        raise OutputError(
            f"experiment {dirs.path} is in use by another running tffpipe process; wait for it to finish, "
            "or pick another experiment name"
        ) from e
    _held_locks[path] = handle


def remove_stale_checkpoint_files(dirs: ExperimentDirs) -> list[str]:
    """Removes half-written checkpoints (`program_state_<n>_temp<k>`) a killed run left behind."""
    removed = []
    if os.path.isdir(dirs.checkpoints):
        for name in os.listdir(dirs.checkpoints):
            if _CHECKPOINT_TEMP.match(name):
                shutil.rmtree(os.path.join(dirs.checkpoints, name), ignore_errors=True)
                removed.append(name)
    return removed


def record_hparams(dirs: ExperimentDirs, hparams: Mapping[str, Any]) -> None:
    """Rewrites hparams.json after a successful (resumed) run, e.g. with a raised round count."""
    write_json(dirs.hparams, hparams)


def write_json(path: str, value: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class CheckpointError(errors.InputError):
    """A checkpoint cannot be loaded or does not fit the current model."""


class ArrayProgramStateManager(tff.program.FileProgramStateManager):
    """TFF's file program state manager, writing each version as one `.npz` of the state's arrays.

    TFF's own writes a SavedModel: it wraps every array in a `tf.Variable` and traces a
    module, 30-40 ms of Python per round for small models, which a background write
    still takes from the round on 2 cores (round 24 -> 38 ms on the fixed-cost
    workload). A learning process state is a nest of numpy arrays, so the arrays are
    written in one file instead (under a millisecond for small models); versions,
    retention (`keep_total`) and atomic renames stay TFF's. Versions written as a
    SavedModel (by earlier tffpipe versions) still load.
    """

    _FILE = "state.npz"
    _PATHS = "structure.json"  # the nest without its values, to refuse a state of another structure

    async def save(self, program_state, version: int) -> None:
        leaves = tf.nest.flatten(program_state)
        if not all(isinstance(v, (np.ndarray, np.generic, int, float, bool)) for v in leaves):
            return await super().save(program_state, version)  # anything but arrays: TFF's format
        path = self._get_path_for_version(version)
        if os.path.exists(path):
            raise tff.program.ProgramStateExistsError(version=version, path=self._root_dir)
        temp = f"{path}_temp{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        os.makedirs(temp)
        with open(os.path.join(temp, self._FILE), "wb") as f:
            np.savez(f, *[np.asarray(v) for v in leaves])
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(temp, self._PATHS), "w") as f:
            json.dump(_leaf_paths(program_state), f)
        os.rename(temp, path)
        await self._remove_old_program_state()

    async def load(self, version: int, structure):
        path = os.path.join(self._get_path_for_version(version), self._FILE)
        if not os.path.exists(path):
            return await super().load(version, structure)
        with open(os.path.join(os.path.dirname(path), self._PATHS)) as f:
            saved_paths = json.load(f)
        if saved_paths != _leaf_paths(structure):
            raise ValueError("the checkpoint and the process state do not have the same nested structure")
        with np.load(path, allow_pickle=False) as arrays:
            leaves = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        leaves = [v[()] if v.ndim == 0 else v for v in leaves]  # scalars back as numpy scalars, as TFF's loader
        return tf.nest.pack_sequence_as(structure, leaves)


def _leaf_paths(structure) -> str:
    """The nest's containers, keys and field names, with every leaf as 0."""
    return repr(tf.nest.map_structure(lambda _: 0, structure))


class Checkpointer:
    """Process state per round through a `tff.program` file program state manager."""

    def __init__(self, directory: str, keep: int = 3):
        self._directory = directory
        self._manager = ArrayProgramStateManager(directory, keep_total=keep, keep_first=False)

    def load_latest(self, structure: Any) -> tuple[Any, int]:
        versions = _run(self._manager.get_versions()) or []
        if not versions:
            return None, 0
        latest = max(versions)
        where = f"checkpoint of round {latest} in {self._directory}"
        try:
            state = _run(self._manager.load(latest, structure))
        except (TypeError, ValueError) as e:
            if "same nested structure" not in str(e):
                raise CheckpointError(_unreadable(where, latest, e)) from e
            raise CheckpointError(
                f"{where} holds a process state of another structure than this run builds (written by another "
                "tffpipe version, or with settings that change the learning process). Nothing was changed. "
                "Resume it with the code that wrote it, or start a new experiment."
            ) from e
        except Exception as e:  # noqa: BLE001  (SavedModel raises many types on damaged files)
            raise CheckpointError(_unreadable(where, latest, e)) from e
        _check_same_shapes(structure, state, where)
        return state, latest

    def save(self, state: Any, round_num: int) -> None:
        try:
            _run(self._manager.save(state, round_num))
        except (OSError, tf.errors.OpError) as e:
            reason = "the disk is full" if _disk_full(e) else f"{type(e).__name__}: {_first_line(e)}"
            raise WriteFault(
                f"could not write the checkpoint of round {round_num} in {self._directory}: {reason}. "
                "Earlier checkpoints are intact; free space (or fix the directory) and rerun to resume."
            ) from e


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _disk_full(error: Exception) -> bool:
    return getattr(error, "errno", None) == 28 or isinstance(error, tf.errors.ResourceExhaustedError)


def _unreadable(where: str, latest: int, error: Exception) -> str:
    return (
        f"{where} is unreadable ({type(error).__name__}: {_first_line(error)}). Nothing was changed. "
        f"Delete program_state_{latest} there to resume from the one before, or start a new experiment."
    )


def _check_same_shapes(expected: Any, loaded: Any, what: str) -> None:
    want = [np.shape(x) for x in tf.nest.flatten(expected)]
    try:
        have = [np.shape(x) for x in tf.nest.flatten(loaded)]
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} does not have the structure of this model's state: {e}") from e
    if want != have:
        raise CheckpointError(
            f"{what} was written for another model (its tensors have other shapes). It is kept untouched; "
            "pick a new experiment name or rerun with the original model."
        )


class _FlushingTensorBoardReleaseManager(tff.program.TensorBoardReleaseManager):
    """TFF's TensorBoard manager, flushed after each release so committed rounds are on disk."""

    async def release(self, value, key: int) -> None:
        await super().release(value, key)
        self._summary_writer.flush()


class MetricsReleaser:
    """Per-round metrics to CSV at once, and to TensorBoard when the round is checkpointed.

    `release` runs on the loop's thread and `commit` on the checkpoint writer's
    (`training_loop`), so the rounds waiting for TensorBoard are guarded by a lock.
    """

    def __init__(self, dirs: ExperimentDirs):
        self._dirs = dirs
        self._csv = tff.program.CSVFileReleaseManager(dirs.metrics_csv, key_fieldname="round")
        self._tensorboard: _FlushingTensorBoardReleaseManager | None = None  # opened on first commit
        self._pending: dict[int, Mapping[str, float]] = {}
        self._lock = threading.Lock()

    def resume(self, round_num: int) -> None:
        """Drops CSV rows after checkpoint `round_num`; re-sends committed rows TensorBoard lacks."""
        rows = read_metrics(self._dirs.metrics_csv)
        kept = [r for r in rows if int(r["round"]) <= round_num]
        if len(kept) != len(rows):
            _rewrite_csv(self._dirs.metrics_csv, kept)
            self._csv = tff.program.CSVFileReleaseManager(self._dirs.metrics_csv, key_fieldname="round")
        committed = _read_int(os.path.join(self._dirs.tensorboard, _TB_COMMITTED))
        with self._lock:
            self._pending = {
                int(r["round"]): {k: float(v) for k, v in r.items() if k != "round" and v != ""}
                for r in kept
                if int(r["round"]) > committed
            }
        self.commit(round_num)

    def release(self, round_num: int, metrics: Mapping[str, float | np.ndarray]) -> None:
        """Scalars go to the CSV row; arrays (e.g. each evaluated client's accuracy) only to TensorBoard histograms.

        Arrays of rounds the CSV holds but TensorBoard had not committed before a kill are
        not re-derivable from the CSV on resume (`resume`): those rounds keep their scalars.
        """
        _run(self._csv.release({k: v for k, v in metrics.items() if np.ndim(v) == 0}, key=round_num))
        with self._lock:
            self._pending[round_num] = metrics

    def commit(self, round_num: int) -> None:
        with self._lock:
            ready = [(r, self._pending.pop(r)) for r in sorted(k for k in self._pending if k <= round_num)]
        if ready and self._tensorboard is None:
            self._tensorboard = _FlushingTensorBoardReleaseManager(self._dirs.tensorboard)
        for r, metrics in ready:
            finite = {k: _finite(v) for k, v in metrics.items() if np.ndim(v) or math.isfinite(v)}
            _run(self._tensorboard.release(finite, key=r))
        if round_num > 0:
            path = os.path.join(self._dirs.tensorboard, _TB_COMMITTED)
            with open(f"{path}.tmp", "w") as f:
                f.write(str(round_num))
            os.replace(f"{path}.tmp", path)


def _finite(value):
    """A scalar as is; an array without its non-finite entries (a histogram cannot bin them)."""
    if np.ndim(value) == 0:
        return value
    value = np.asarray(value)
    return value[np.isfinite(value)]


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def read_metrics(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rewrite_csv(path: str, rows: Sequence[Mapping[str, str]]) -> None:
    with open(path, newline="") as f:
        fieldnames = next(csv.reader(f), ["round"])
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_hparams_summary(dirs: ExperimentDirs, hparams: Mapping[str, Any], metric_names: Sequence[str]) -> None:
    """The TensorBoard HParams dashboard entry for this run."""
    from tensorboard.plugins.hparams import api as hp

    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    writer = tf.summary.create_file_writer(dirs.tensorboard)  # same run as the scalars, so the dashboard links them
    with writer.as_default():
        hp.hparams_config(hparams=[hp.HParam(k) for k in flat], metrics=[hp.Metric(m) for m in metric_names])
        hp.hparams(flat, trial_id=dirs.name)
    writer.flush()


def write_samples(dirs: ExperimentDirs, samples_by_client: Mapping[str, np.ndarray]) -> None:
    """A few clients' examples for TensorBoard: images ([n, h, w, c]) or texts (strings)."""
    writer = tf.summary.create_file_writer(dirs.tensorboard)
    with writer.as_default():
        for client_id, samples in samples_by_client.items():
            if np.asarray(samples).dtype.kind in "US":
                tf.summary.text(f"clients/{client_id}", tf.constant(np.asarray(samples)), step=0)
            else:
                tf.summary.image(f"clients/{client_id}", samples, step=0, max_outputs=len(samples))
    writer.flush()


def write_summary_plot(dirs: ExperimentDirs) -> None:
    """summary.png: train/eval accuracy and epsilon over rounds, from metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(dirs.metrics_csv)
    if not rows:
        return

    def series(name: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["round"]), float(r[name])) for r in rows if r.get(name, "") != ""]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, style in (("train/accuracy", "-"), ("eval/accuracy", "o-")):
        x, y = series(name)
        if x:
            ax.plot(x, y, style, label=name, markersize=3)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    x, eps = series("privacy/epsilon")
    if x and all(math.isfinite(e) for e in eps):
        twin = ax.twinx()
        twin.plot(x, eps, "r--", label="privacy/epsilon")
        twin.set_ylabel("epsilon", color="r")
        twin.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(dirs.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(dirs.summary_png)
    plt.close(fig)
