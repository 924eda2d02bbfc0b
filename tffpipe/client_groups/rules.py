"""What `client_batching` decides: whether and how large `auto` groups (by model kind,
`AUTO_GROUPS`, one group per core for `ONE_GROUP_PER_CORE` kinds), why a configuration
runs per client (`auto_obstacle`, `auto_note`, `shared_obstacle`), and whether an explicit
K fits (`check_model`, `check_member_memory`).

Keras-wrapped models (member loop, same clients and state, per-client and grouped rounds
alternated; `python -m benchmarks.client_groups --cg_workloads=default,keyboard
--group_sizes=5,25,auto --rounds=2`, then twice `--group_sizes=auto --rounds=3`; load average
13-35 on the 2 cores, so CPU seconds per round, this process and TFF's worker, are given
beside the wall ratio):

* default run (small_cnn, ~52 clients x 5 epochs, fixed DP), K=50: wall ratio
  (per-client / grouped) 0.79x, 1.49x, 0.91x, 1.03x in four runs; CPU 3.35 / 3.15 s,
  3.40 / 3.43 s, 3.16 / 3.43 s (0.92-1.06x). K=25 1.09x, K=5 1.04x (CPU 0.93x, 0.91x).
  Another session's run: 0.87x wall, 1.07x CPU. No gain, and why is open: the
  converted model's step is not dearer in itself (in plain graph-mode TF on one thread,
  400 steps of batch 20 took 0.60-0.68 s CPU converted against 0.59-0.66 s
  Keras-wrapped), yet the grouped round spends what grouping saves per call (~30 ms of
  CPU per client beyond the steps' ~1.6 s) somewhere else. `auto` runs convolutional
  models per client.
* keyboard (cifg_lstm, 10 users x ~80 sequences, FedAvg): K=10 1.26x and 1.56x wall,
  CPU 8.91 / 8.53 s and 7.44 / 6.92 s (1.04-1.08x); K=5 1.36x and 1.27x (CPU 0.99x,
  1.01x). Another session's runs in the same hour (BENCHMARKS.md) measured 0.86x (K=5),
  0.93x and 0.95x (K=10) wall, CPU 0.99-1.07x: the wall ratio is the load's, the CPU
  ratio (0.99-1.08x over seven runs) what grouping buys. What bounds it: every member
  runs the same steps on the same [16, 20] batches as alone, so the arithmetic (~8.5
  MFLOP a token forward and back, 20 tokens a sequence: 123-149 GFLOP a round, ~17
  GFLOP per CPU second on both paths) is untouched; grouping saves only the per-call
  cost, ~40-50 ms of CPU per user. Beyond that needs members stepping together
  (`train_members_batched`, not tried on the LSTM). `auto` groups
  recurrent models (CPU at most 1% above per client, up to 8% below), one group per core: a
  group's members run in turn on the worker's one op thread, so on an idle machine one
  group would leave a core the per-client calls use; K=5 costs 3-5% more CPU than K=10
  here, where the cores are busy anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import tensorflow as tf

from tffpipe import configs, models
from tffpipe.client_groups.batched import dense_activations
from tffpipe.client_groups.functional import functional_obstacle
from tffpipe.client_groups.grouped_process import GroupedLearningProcess
from tffpipe.client_groups.packing import GroupingError


def check_model(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> None:
    """An explicit group size needs a model `create_functional_model` can convert.

    Raises:
      GroupingError: naming the model and why.
    """
    explicit = configs.client_group_size(config)
    reason = None if explicit is None else functional_obstacle(keras_model)
    if reason is not None:
        raise GroupingError(f"client_batching={explicit} cannot run: model {config.model}: {reason}; use off or auto")
    if explicit is not None:
        check_member_memory(config, explicit, models.weight_bytes(keras_model.trainable_weights))


def check_member_memory(config: configs.ExperimentConfig, k: int, update_bytes: int) -> None:
    """K groups' stacked member updates must fit a group's memory budget (`configs.member_group_limit`).

    Raises:
      GroupingError: naming client_batching, the memory it needs and the largest K that fits.
    """
    limit = configs.member_group_limit(config, update_bytes)
    if limit is not None and k > limit:
        need = configs.GROUP_UPDATE_COPIES * k * update_bytes
        raise GroupingError(
            f"client_batching={k} cannot run: with {config.dp.mechanism.value} DP"
            f"{' and zeroing' if config.dp.zeroing_norm > 0 else ''} a group sends each member's update, "
            f"{need / 1e9:,.1f} GB for {k} members of {update_bytes:,} bytes ({configs.GROUP_UPDATE_COPIES} copies), "
            f"over a group's share of this machine's memory; use at most {limit}, or auto"
        )


_CONVOLUTIONAL = (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)


_RECURRENT = (tf.keras.layers.RNN,)  # LSTM and GRU are RNN layers too


def model_kind(keras_model: tf.keras.Model) -> str:
    """ "recurrent", "convolutional" or "dense": what decides whether `auto` groups (`AUTO_GROUPS`)."""
    layers = list(keras_model.submodules)
    if any(isinstance(m, _RECURRENT) for m in layers):
        return "recurrent"
    if any(isinstance(m, _CONVOLUTIONAL) for m in layers):
        return "convolutional"
    return "dense"


# Whether `client_batching=auto` groups a model of this kind: where grouped rounds measured
# faster than per-client ones (benchmarks/client_groups.py, figures in the module doc and
# BENCHMARKS.md). Convolutional: small_cnn's grouped rounds took as much CPU or more
# (per-client / grouped 0.92-1.07x) and wall time straddled 1 (0.79x-1.49x). Recurrent:
# cifg_lstm's took as much CPU or less (0.99-1.08x over seven runs), wall 0.86x-1.56x.
AUTO_GROUPS = {"dense": True, "convolutional": False, "recurrent": True}


# Kinds whose rounds (training, and evaluation in `group_evaluation`) are compute-bound: `auto`
# makes one group per core, not per worker, since a worker runs each call on one op thread
# and a group's members run in turn. (Training also splits groups whose members step on the
# shared weights per core: `group_size`.)
ONE_GROUP_PER_CORE = frozenset({"recurrent"})


def auto_groups(config: configs.ExperimentConfig, per_core: bool) -> int:
    """How many groups `auto` makes a round: one per worker, or one per core (at least one per worker).

    Cores are counted only where the workers run here (`runtime.local_workers`): this
    machine's cores are theirs. Remote workers (`runtime.workers`) get one group each
    whatever `per_core` says: this process cannot see their cores, and the coordinator's
    count would be a guess (a 2-core coordinator under-splits for 64-core workers, a
    64-core one splits a round into 64 groups for one small worker, each paying its
    per-group cost). For more groups per remote worker, give `client_batching=K`.
    """
    if config.runtime.workers:
        return len(config.runtime.workers)
    workers = max(1, config.runtime.local_workers)
    return max(workers, os.cpu_count() or 1) if per_core else workers


def group_size(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> int | None:
    """K for `config.client_batching` with this model (the task's Keras model); None: per client.

    off: None. K: K, if `create_functional_model` can convert the model (`configs` has
    checked the rest). auto: one group per worker, ceil(m / workers), where the model,
    its kind (`AUTO_GROUPS`) and the configuration allow, else None; recurrent models, and
    dense ones whose members step on the shared weights (`shared_obstacle` None), one
    group per core, ceil(m / max(workers, cores)), since a group runs on one op thread
    (with remote workers, whose cores this process cannot count, one group per worker;
    `auto_groups`; W3, 1,000 linear clients, same runs, 2026-12-06: K=500 6.53x,
    6.46x and 7.29x the per-client rounds against K=1000 5.48x, 5.45x and 6.09x,
    BENCHMARKS.md). Otherwise one group per worker, where few large groups measured
    fastest on 2026-12-05 (the member loop: W3 K=1000 2.42x the per-client rounds against
    K=100 1.30x), in runs that rebuilt every variant's executor each round; with the
    executors kept (2026-12-06) the member loop's two groups of 500 and one of 1,000
    measured alike (2.45-2.80x and 2.27-2.82x, ~8 ms of CPU a group). Groups that send their
    members' updates (`configs.group_sends_members`) are capped at
    `configs.member_group_limit` (an explicit K over it is refused by `check_model`).

    Raises:
      GroupingError: an explicit K for a model that cannot be converted.
    """
    if config.client_batching == "off":
        return None
    reason = functional_obstacle(keras_model)
    explicit = configs.client_group_size(config)
    if explicit is not None:
        if reason is not None:  # `program.check` says so before any data is generated
            raise GroupingError(f"client_batching={explicit} cannot run: model {config.model}: {reason}")
        return explicit
    if auto_obstacle(config, keras_model) is not None:
        return None
    workers = max(1, len(config.runtime.workers) or config.runtime.local_workers)
    groups = auto_groups(
        config, model_kind(keras_model) in ONE_GROUP_PER_CORE or shared_obstacle(config, keras_model) is None
    )
    k = max(1, -(-config.clients_per_round // groups))
    if not configs.group_sends_members(config.dp):
        return k
    limit = configs.member_group_limit(config, models.weight_bytes(keras_model.trainable_weights))
    # The budget is a worker's; its groups (groups / workers of them) may run at once.
    return min(k, max(1, limit * workers // groups)) if limit is not None else k


def auto_obstacle(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> str | None:
    """Why `client_batching=auto` trains this configuration and model per client, or None: it groups.

    In this order: the aggregation needs each real client's own update
    (`configs.per_client_reason`), the configuration has no grouped path
    (`configs.client_batching_obstacle`), the model cannot be converted
    (`functional_obstacle`), or its kind measured slower in groups (`AUTO_GROUPS`).
    `group_size` groups exactly when this is None, and `auto_note` says it.
    """
    reason = configs.per_client_reason(config) or configs.client_batching_obstacle(config)
    if reason is not None:
        return reason
    reason = functional_obstacle(keras_model)
    if reason is not None:
        return f"model {config.model}: {reason}"
    kind = model_kind(keras_model)
    if not AUTO_GROUPS[kind]:
        return f"model {config.model} is {kind}, and {kind} models measured no faster in groups than per client"
    return None


def auto_note(config: configs.ExperimentConfig, process, keras_model_fn: Callable[[], tf.keras.Model]) -> str | None:
    """Under `client_batching=auto`, why `process` trains per client, in one line; None if it groups.

    `process` is what `algorithms.build_learning_process` built for `config`; the reason
    is `auto_obstacle`'s, the one `group_size` decided by. `keras_model_fn` builds the
    task's Keras model, called only when the configuration alone does not say why.
    """
    if config.client_batching != "auto" or isinstance(process, GroupedLearningProcess):
        return None
    reason = configs.per_client_reason(config) or configs.client_batching_obstacle(config)
    reason = reason or auto_obstacle(config, keras_model_fn())
    return f"client_batching=auto runs per client: {reason}"


def shared_obstacle(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> str | None:
    """Why `build_learning_process` does not step a group's members together on the shared weights, or None.

    That path (`train_members_shared`) runs plain SGD steps of a Flatten/Dense stack
    (`dense_activations`): FedAvg's client work, which the server-optimizer variants
    share; FedProx adds a proximal term and FedSGD takes no step, and the audit's
    canaries replace a member's own result, so those run their members one after the
    other, as does local work of more than `SHARED_MAX_STEPS` steps.

    ReLU stacks (`mlp`) step together too: their pre-activations are summed in another
    order than per client, so one within rounding of 0 now and then takes the other side
    of the ReLU (W2, mlp, 100 clients: 2.2e-05 relative after a benchmark's last round
    once, ~1e-7 in rounds compared one by one; the member loop, `batched=False`, gives
    the per-client weights bit for bit). The path was kept for ReLU-free stacks while it
    measured no faster on W2; with each variant's executor kept on the worker
    (`benchmarks.client_groups`, 2026-12-06) it takes 0.16-0.17 s of CPU a round on W2
    against the member loop's 0.28-0.30 (BENCHMARKS.md), which is what W2's 2x needs.
    """
    activations = dense_activations(keras_model)
    if activations is None:
        return "not a stack of Flatten and Dense layers"
    if config.algorithm.algorithm in (configs.Algorithm.FEDPROX, configs.Algorithm.FEDSGD):
        return f"{config.algorithm.algorithm.value} is not plain SGD steps"
    if config.privacy.canaries:
        return "canaries replace a member's own update"
    steps = max_local_steps(config)
    if steps is None or steps > SHARED_MAX_STEPS:
        bound = "unbounded (real files)" if steps is None else f"up to {steps}"
        return (
            f"local steps {bound}: a member's corrections grow with the square of its steps, "
            f"so the shared path is taken up to {SHARED_MAX_STEPS}"
        )
    return None


# The shared path's per-member corrections for T local steps of B rows cost about
# T * B * (in + out) / (6 * in * out) of the steps themselves (0.058 T for `linear`), and its
# history holds T * B * (in + out) floats a member (68 KB a step for `linear`, B = 20): measured
# only at W3's T = 2 (1 epoch of ~20 examples), so `auto` takes it for short local work only.
SHARED_MAX_STEPS = 8


def max_local_steps(config: configs.ExperimentConfig) -> int | None:
    """The most local steps a client can take in a round; None when the data's client sizes are unknown."""
    cap = config.preprocess.max_examples_per_client
    if cap <= 0:
        if config.data.data_dir is not None or config.task is not configs.Task.EMNIST:
            return None
        population = config.data.population  # the generator's sizes: log-normal, at most 10 x the median
        cap = population.median_examples * (1 if population.quantity_sigma == 0 else 10)
    return config.preprocess.epochs * -(-cap // config.preprocess.batch_size)
