"""The round loop with hand-written fakes: ordering, resume, NaN handling."""

import dataclasses
import math
import time

import pytest

from tffpipe import configs, errors, training_loop


@dataclasses.dataclass
class Output:
    state: int
    metrics: dict


class FakeProcess:
    """State is an int; each round adds the number of clients. Loss can be scripted."""

    def __init__(self, losses=None):
        self.losses = losses or {}
        self.calls = 0

    def initialize(self):
        return 0

    def next(self, state, clients):
        self.calls += 1
        loss = self.losses.get(state + len(clients), 1.0 / (1 + state))
        return Output(state + len(clients), {"client_work": {"train": {"loss": loss, "num_examples": 10.0}}})

    def get_model_weights(self, state):
        return state


class FakeSampler:
    def sample(self, r):
        return [f"c{r}"] * 2


class FakeCheckpointer:
    def __init__(self):
        self.saved = {}

    def load_latest(self, structure):
        if not self.saved:
            return None, 0
        r = max(self.saved)
        return self.saved[r], r

    def save(self, state, r):
        self.saved[r] = state


class FakeReleaser:
    def __init__(self):
        self.rows, self.committed, self.events = {}, 0, []

    def resume(self, r):
        self.rows = {k: v for k, v in self.rows.items() if k <= r}
        self.events.append(("resume", r))

    def release(self, r, metrics):
        self.rows[r] = dict(metrics)
        self.events.append(("release", r))

    def commit(self, r):
        self.committed = r
        self.events.append(("commit", r))


def _run(process, checkpointer, releaser, rounds, **kwargs):
    return training_loop.run(
        process=process,
        sampler=FakeSampler(),
        checkpointer=checkpointer,
        releaser=releaser,
        config=configs.LoopConfig(rounds=rounds, **kwargs),
        evaluate=lambda w, r: {"eval/accuracy": w / 100},
    )


def test_every_round_is_released_before_its_commit_and_the_last_round_is_committed():
    releaser = FakeReleaser()
    result = _run(FakeProcess(), FakeCheckpointer(), releaser, rounds=3, eval_every=2)
    assert result.state == 6 and result.last_round == 3
    events = releaser.events
    assert events[0] == ("resume", 0) and events[-1] == ("commit", 3)
    assert [e for e in events if e[0] == "release"] == [("release", 1), ("release", 2), ("release", 3)]
    for kind, r in events:
        if kind == "commit":
            assert events.index(("release", r)) < events.index((kind, r))
    assert "eval/accuracy" in releaser.rows[2] and "eval/accuracy" in releaser.rows[3]
    assert "eval/accuracy" not in releaser.rows[1]


def test_resume_continues_after_the_last_checkpoint_and_extends_a_finished_run():
    checkpointer, releaser = FakeCheckpointer(), FakeReleaser()
    _run(FakeProcess(), checkpointer, releaser, rounds=4, checkpoint_every=3)
    assert sorted(checkpointer.saved) == [3, 4]
    process = FakeProcess()
    result = _run(process, checkpointer, releaser, rounds=6)
    assert process.calls == 2 and result.resumed_from == 4 and result.state == 12
    assert sorted(releaser.rows) == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint():
    checkpointer = FakeCheckpointer()
    with pytest.raises(training_loop.NonFiniteLossError, match=r"round 3 .*\(nan\)") as e:
        _run(FakeProcess(losses={6: math.nan}), checkpointer, FakeReleaser(), rounds=5)
    # Round 2, the last good one, is saved before the error even if its write was skipped.
    assert max(checkpointer.saved) == 2 and checkpointer.saved[2] == 4
    assert "the last good checkpoint (round 2) is kept" in str(e.value)


def test_nan_loss_saves_the_last_good_round_that_came_while_a_write_was_under_way():
    class SlowCheckpointer(FakeCheckpointer):
        def save(self, state, r):
            time.sleep(0.5)  # round 1's write is still under way when round 2 ends: round 2 is skipped
            super().save(state, r)

    checkpointer = SlowCheckpointer()
    with pytest.raises(training_loop.NonFiniteLossError, match=r"round 3 .*the last good checkpoint \(round 2\)"):
        _run(FakeProcess(losses={6: math.nan}), checkpointer, FakeReleaser(), rounds=5)
    assert checkpointer.saved == {1: 2, 2: 4}  # round 2's state, saved after the write of round 1


def test_checkpoints_are_written_one_at_a_time_and_rounds_do_not_wait_for_them():
    class SlowCheckpointer(FakeCheckpointer):
        def save(self, state, r):
            time.sleep(0.3)
            super().save(state, r)

    checkpointer = SlowCheckpointer()
    began = time.monotonic()
    result = _run(FakeProcess(), checkpointer, FakeReleaser(), rounds=20)
    # 20 saves in a row would take 6 s; rounds went on while at most one save ran, and the
    # rounds that came during a save were not checkpointed. The last round always is.
    assert time.monotonic() - began < 3
    assert result.last_round == 20 and max(checkpointer.saved) == 20 and 2 <= len(checkpointer.saved) < 20
    assert checkpointer.saved[20] == 40


def test_a_failed_background_write_stops_the_run_in_the_loops_thread():
    class FullDisk(FakeCheckpointer):
        def save(self, state, r):
            raise errors.Fault("disk full")

    with pytest.raises(errors.Fault, match="disk full"):
        _run(FakeProcess(), FullDisk(), FakeReleaser(), rounds=5)


def test_round_where_tff_dropped_every_client_as_non_finite_counts_as_nan():
    class ZeroedProcess(FakeProcess):
        def next(self, state, clients):
            out = super().next(state, clients)
            if out.state >= 4:  # round 2: TFF zeroed every client's metrics
                out.metrics["client_work"]["train"].update(loss=0.0, num_examples=0.0)
            return out

    checkpointer = FakeCheckpointer()
    with pytest.raises(training_loop.NonFiniteLossError, match="round 2"):
        _run(ZeroedProcess(), checkpointer, FakeReleaser(), rounds=3)
    assert sorted(checkpointer.saved) == [1]  # round 1's write is waited for


def test_stop_request_saves_and_returns_early():
    checkpointer = FakeCheckpointer()
    result = training_loop.run(
        process=FakeProcess(),
        sampler=FakeSampler(),
        checkpointer=checkpointer,
        releaser=FakeReleaser(),
        config=configs.LoopConfig(rounds=10, checkpoint_every=5),
        stop_requested=lambda: True,
    )
    assert result.stopped_early and result.last_round == 1 and checkpointer.saved == {1: 2}


class FakeCarry:
    """Counts the rounds it has seen; restored from the checkpoint beside the state."""

    def __init__(self):
        self.seen, self.restored = 0, []

    def state(self):
        return self.seen

    def restore(self, saved, process_state):
        self.restored.append((saved, process_state))
        self.seen = saved or 0


def test_a_carry_is_checkpointed_with_the_state_and_restored_on_resume():
    class CountingProcess(FakeProcess):
        def __init__(self, carry):
            super().__init__()
            self.carry = carry

        def next(self, state, clients):
            self.carry.seen += 1
            return super().next(state, clients)

    checkpointer, carry = FakeCheckpointer(), FakeCarry()
    training_loop.run(
        process=CountingProcess(carry),
        sampler=FakeSampler(),
        checkpointer=checkpointer,
        releaser=FakeReleaser(),
        config=configs.LoopConfig(rounds=3),
        carry=carry,
    )
    assert checkpointer.saved[3] == (6, 3)  # (process state, the carry as of round 3)
    resumed = FakeCarry()
    training_loop.run(
        process=CountingProcess(resumed),
        sampler=FakeSampler(),
        checkpointer=checkpointer,
        releaser=FakeReleaser(),
        config=configs.LoopConfig(rounds=5),
        carry=resumed,
    )
    assert resumed.restored == [(3, 6)] and checkpointer.saved[5] == (10, 5)
