"""The round loop: select -> next -> evaluate -> release -> checkpoint.

It knows nothing of Keras, tasks, DP or flags: every collaborator is passed in, so
tests drive it with small fakes. Its one job is ordering, which is what makes runs
resumable without gaps or duplicates:

1. round r trains on `sampler.sample(r)`, a pure function of (seed, r);
2. its metrics go to the releaser (`release`), which replaces any earlier row r;
3. at a checkpoint round, the state is saved and only then does the releaser
   `commit` (e.g. write TensorBoard), so what is committed is always re-derivable;
4. on start, the latest checkpoint c is loaded and the releaser is told to `resume(c)`,
   dropping uncommitted rows above c, which the loop then recomputes identically.

Step 3 runs on a background thread while the next rounds train (`_Saver`): the state
a round returns is already materialized, and writing it took 30-40% of a small
model's round. One checkpoint is written at a time; a checkpoint round that comes
while the previous write is still going is skipped, so the cadence stretches rather
than the rounds. The last round, a stop request and a fault wait for the write.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from tffpipe import configs, errors

Metrics = Mapping[str, float]


class NonFiniteLossError(errors.Fault):
    """A round produced a NaN or infinite loss; nothing of that round was saved."""

    exit_code = 3


class Sampler(Protocol):
    def sample(self, round_num: int) -> Sequence[str]: ...


class Checkpointer(Protocol):
    def load_latest(self, structure: Any) -> tuple[Any, int]: ...

    def save(self, state: Any, round_num: int) -> None: ...


class Carry(Protocol):
    """A collaborator's state that is checkpointed with the process state (the audit's statistics).

    `state()` is a nest of arrays as of the last round; `restore(saved, process_state)`
    starts it from a checkpoint (`saved` is None on a fresh start).
    """

    def state(self) -> Any: ...

    def restore(self, saved: Any, process_state: Any) -> None: ...


class Releaser(Protocol):
    def resume(self, round_num: int) -> None: ...

    def release(self, round_num: int, metrics: Metrics) -> None: ...

    def commit(self, round_num: int) -> None: ...


@dataclasses.dataclass
class LoopResult:
    state: Any
    last_round: int
    resumed_from: int
    stopped_early: bool


class _Saver:
    """Checkpoint writes (each followed by its commit) on one background thread, one at a time."""

    def __init__(self, checkpointer: Checkpointer, releaser: Releaser, last_saved: int, carry: Carry | None = None):
        self._carry = carry
        self._checkpointer = checkpointer
        self._releaser = releaser
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._future: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        self._last_saved = last_saved

    @property
    def last_saved(self) -> int:
        with self._lock:
            return self._last_saved

    def _with_carry(self, state: Any) -> Any:
        """The checkpointed value: the state, or (state, a snapshot of the carry) taken now."""
        return state if self._carry is None else (state, self._carry.state())

    def _write(self, value: Any, round_num: int) -> None:
        self._checkpointer.save(value, round_num)
        self._releaser.commit(round_num)
        with self._lock:
            self._last_saved = round_num

    def submit(self, state: Any, round_num: int) -> None:
        """Starts writing round `round_num`, unless a write is under way (then this round is skipped)."""
        if self._future is not None:
            if not self._future.done():
                return
            self._future.result()  # a failed write surfaces here, in the loop's thread
        self._future = self._executor.submit(self._write, self._with_carry(state), round_num)

    def wait(self) -> None:
        """Returns once no write is under way; raises what a write raised."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def save_now(self, state: Any, round_num: int) -> None:
        self.wait()
        if self.last_saved != round_num:
            self._write(self._with_carry(state), round_num)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _train_metrics(output_metrics: Mapping) -> dict[str, float]:
    train = output_metrics["client_work"]["train"]
    return {f"train/{k}": float(v) for k, v in train.items()}


def run(
    *,
    process,
    sampler: Sampler,
    checkpointer: Checkpointer,
    releaser: Releaser,
    config: configs.LoopConfig,
    evaluate: Callable[[Any, int], Metrics] | None = None,
    round_metrics: Callable[[int, Any, Sequence[str]], Metrics] | None = None,
    progress: Callable[[int, Metrics], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    carry: Carry | None = None,
) -> LoopResult:
    """Runs rounds (latest checkpoint + 1) .. rounds.

    Args:
      process: a `tff.learning.templates.LearningProcess` whose `next` takes client ids.
      sampler: client ids per round.
      checkpointer: loads and saves (state, round).
      releaser: receives each round's metrics (see module doc for the protocol).
      config: rounds and cadences.
      evaluate: (model weights, round) -> eval metrics, run every `eval_every` rounds and last.
      round_metrics: (round, process output, clients) -> extra metrics (privacy, system).
      progress: called with each round's metrics, after release.
      stop_requested: polled after each round; True saves a checkpoint and returns.
      carry: state checkpointed beside the process state (saved as the pair).

    Raises:
      NonFiniteLossError: the round's loss was NaN/inf; the last checkpoint is kept.
    """
    initial_state = process.initialize()
    structure = initial_state if carry is None else (initial_state, carry.state())
    saved, start = checkpointer.load_latest(structure)
    if saved is None:
        saved, start = structure, 0
    state = saved if carry is None else saved[0]
    if carry is not None:
        carry.restore(saved[1] if start else None, state)
    releaser.resume(start)
    saver = _Saver(checkpointer, releaser, start, carry)
    try:
        return _rounds(
            process, state, start, sampler, saver, releaser, config, evaluate, round_metrics, progress, stop_requested
        )
    finally:
        saver.close()


def _rounds(
    process, state, start, sampler, saver, releaser, config, evaluate, round_metrics, progress, stop_requested
) -> LoopResult:
    round_num = start
    for round_num in range(start + 1, config.rounds + 1):
        clients = list(sampler.sample(round_num))
        began = time.perf_counter()
        metrics: dict[str, float] = {}
        if clients:
            output = process.next(state, clients)
            metrics.update(_train_metrics(output.metrics))
            loss = metrics.get("train/loss", math.nan)  # a missing loss is as unusable as a NaN one
            if metrics.get("train/num_examples") == 0:
                # TFF zeroes a client's update *and metrics* when they are not finite, so a
                # round where every client diverged reports loss 0 over 0 examples, not NaN.
                loss = math.nan
            if not math.isfinite(loss):
                # `state` is still the last good round's, and so is the carry (round metrics, which
                # update it, come after this check); a busy writer may have skipped it: save it now.
                saver.save_now(state, round_num - 1)
                raise NonFiniteLossError(
                    f"round {round_num} produced a non-finite training loss ({loss}); "
                    f"the last good checkpoint (round {saver.last_saved}) is kept. Lower the client learning rate, "
                    "or bound the updates (DP clipping, or a zeroing norm)."
                )
            state = output.state
            if round_metrics is not None:
                metrics.update(round_metrics(round_num, output, clients))
        elif round_metrics is not None:
            metrics.update(round_metrics(round_num, None, clients))
        seconds = time.perf_counter() - began
        metrics["system/round_seconds"] = seconds
        metrics["system/clients"] = float(len(clients))
        metrics["system/client_examples_per_second"] = metrics.get("train/num_examples", 0.0) / max(seconds, 1e-9)
        stopping = stop_requested()
        if evaluate is not None and (round_num % config.eval_every == 0 or round_num == config.rounds or stopping):
            metrics.update(evaluate(process.get_model_weights(state), round_num))
        releaser.release(round_num, metrics)
        if progress is not None:
            progress(round_num, metrics)
        if round_num == config.rounds or stopping:
            saver.save_now(state, round_num)
        elif round_num % config.checkpoint_every == 0:
            saver.submit(state, round_num)
        if stopping:
            return LoopResult(state, round_num, start, stopped_early=round_num < config.rounds)
    saver.save_now(state, round_num)  # also when there was no round to run: waits for nothing
    return LoopResult(state, round_num, start, stopped_early=False)
