"""The program: wires data, task, DP, accounting, processes and outputs, then runs the loop.

Binaries build an `ExperimentConfig` from flags and call `run`. This module is the
only place that knows all the parts; `training_loop` only sees abstract collaborators.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import IO

import numpy as np
import tensorflow as tf

from tffpipe import accounting, aggregation, algorithms, configs, devices, outputs, runtime, tasks, training_loop
from tffpipe.data import emnist_files, generator, sampling


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything built before round 1, kept for tests and the evaluate binary."""

    config: configs.ExperimentConfig
    task: tasks.Task
    plan: accounting.PrivacyPlan
    dp: aggregation.DpConfig
    data_dir: str


def resolve_data_dir(config: configs.ExperimentConfig) -> str:
    return config.data.data_dir or generator.ensure_generated(config.data.cache_dir, config.data.population)


def load_task(config: configs.ExperimentConfig, data_dir: str) -> tasks.Task:
    train, test = emnist_files.load_client_rows(data_dir, config.data.only_digits)
    return tasks.create_task(
        train,
        test,
        num_classes=emnist_files.NUM_CLASSES[config.data.only_digits],
        model_name=config.model,
        preprocess=config.preprocess,
    )


def create_plan(
    config: configs.ExperimentConfig, population: int
) -> tuple[accounting.PrivacyPlan, aggregation.DpConfig]:
    """The privacy plan, with the noise multiplier solved for --target_epsilon when given."""
    if config.clients_per_round > population:
        raise ValueError(
            f"clients_per_round={config.clients_per_round} exceeds the {population} training clients; lower it"
        )
    plan = accounting.PrivacyPlan(
        mechanism=config.dp.mechanism,
        noise_multiplier=config.dp.noise_multiplier,
        clients_per_round=config.clients_per_round,
        population=population,
        sampling=config.sampling,
        delta=config.privacy.delta or accounting.default_delta(population),
        accountant=config.privacy.accountant,
    )
    limit = plan.max_rounds()
    if limit is not None and config.loop.total_rounds > limit:
        raise accounting.AccountingError(
            f"tree aggregation is accounted for clients that take part at most once, which allows at most "
            f"{limit} rounds of {config.clients_per_round} clients from {population}; got rounds="
            f"{config.loop.total_rounds}. Lower --rounds or --clients_per_round, or use --dp=fixed/adaptive."
        )
    dp = config.dp
    if config.privacy.target_epsilon is not None:
        z = accounting.noise_for_target_epsilon(plan, config.loop.total_rounds, config.privacy.target_epsilon)
        plan = dataclasses.replace(plan, noise_multiplier=z)
        dp = dataclasses.replace(dp, noise_multiplier=z)
    aggregation.validate(dp, config.clients_per_round)
    return plan, dp


def prepare(config: configs.ExperimentConfig) -> Prepared:
    data_dir = resolve_data_dir(config)
    task = load_task(config, data_dir)
    plan, dp = create_plan(config, len(task.train_data.client_ids))
    return Prepared(config=config, task=task, plan=plan, dp=dp, data_dir=data_dir)


def create_device_rounds(prepared: Prepared, upload_bytes: int) -> devices.DeviceRounds:
    """Device-model selection over the training clients, with their real example counts."""
    config, task = prepared.config, prepared.task
    ids = task.train_data.client_ids
    if config.devices.profiles_path:
        profiles = devices.load_profiles(config.devices.profiles_path, ids)
    else:
        profiles = devices.create_profiles(ids, config.seed)
    counts = emnist_files.client_example_counts(prepared.data_dir, config.data.only_digits)
    if config.preprocess.max_examples > 0:
        counts = {cid: min(n, config.preprocess.max_examples) for cid, n in counts.items()}
    return devices.DeviceRounds(
        {cid: profiles[cid] for cid in ids},
        counts,
        clients_per_round=config.clients_per_round,
        epochs=config.preprocess.epochs,
        model_bytes=task.model_info.update_bytes,
        update_bytes=upload_bytes,
        config=config.devices,
        seed=config.seed,
    )


class ProgressPrinter:
    """One line per round: round, time, ETA, loss, accuracy, epsilon."""

    def __init__(self, total_rounds: int, stream: IO[str]):
        self._total = total_rounds
        self._stream = stream
        self._seconds: list[float] = []

    def __call__(self, round_num: int, metrics: Mapping[str, float]) -> None:
        self._seconds.append(metrics.get("system/round_seconds", 0.0))
        eta = float(np.median(self._seconds[-10:])) * (self._total - round_num)
        parts = [
            f"round {round_num:>{len(str(self._total))}}/{self._total}",
            f"{metrics.get('system/round_seconds', 0.0):5.2f}s",
            f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s",
            f"loss {metrics.get('train/loss', math.nan):.4f}",
            f"acc {metrics.get('train/accuracy', math.nan):.4f}",
        ]
        if "eval/accuracy" in metrics:
            parts.append(f"eval acc {metrics['eval/accuracy']:.4f}")
        if "privacy/epsilon" in metrics:
            parts.append(f"eps {metrics['privacy/epsilon']:.3g}")
        print(" | ".join(parts), file=self._stream, flush=True)


def _sample_images(task: tasks.Task, seed: int, clients: int = 4, per_client: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x1A6])
    ids = rng.choice(task.test_data.client_ids, size=min(clients, len(task.test_data.client_ids)), replace=False)
    images = {}
    for cid in sorted(ids):
        batch = next(iter(task.test_data.create_tf_dataset_for_client(cid)))
        images[cid] = 1.0 - batch["x"].numpy()[:per_client, ..., 0]  # back to EMNIST's light background
    return images


def run(
    config: configs.ExperimentConfig,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    stream: IO[str] = sys.stdout,
) -> training_loop.LoopResult:
    """Runs (or resumes) the experiment in <root_dir>/<experiment>; see `outputs` for the layout."""
    tf.keras.utils.set_random_seed(config.seed)  # Keras initializers draw from the global seed
    dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
    prepared = prepare(config)
    if config.compression and prepared.dp.is_private:
        raise ValueError("--compression is not combined with DP aggregation; use --dp=none with --compression")
    task, plan, dp = prepared.task, prepared.plan, prepared.dp
    hparams = config.hparams()
    hparams["dp.noise_multiplier"] = dp.noise_multiplier
    resuming = outputs.prepare(dirs, hparams)
    print(
        f"{'resuming' if resuming else 'starting'} {dirs.path}: model {task.model_name} "
        f"({task.model_info.num_parameters:,} parameters, {task.model_info.update_bytes:,} bytes per update), "
        f"{len(task.train_data.client_ids)} clients, {config.clients_per_round} per round",
        file=stream,
        flush=True,
    )
    print(f"privacy: {accounting.describe(plan)}", file=stream, flush=True)
    worker = runtime.install_local_context(log_path=dirs.worker_log)
    try:
        specs = task.record_specs()
        aggregator = aggregation.build_factory(dp, config.clients_per_round, compression=config.compression)
        upload = aggregation.upload_bytes(specs, config.compression)
        process = task.compose_train(
            algorithms.build_training_process(task.learning_model(), config.algorithm, aggregator=aggregator)
        )
        evaluate = None
        if config.eval_clients > 0:
            evaluate = _build_evaluate(task, config)
        device_rounds = None
        if config.devices is not None:
            sampler = device_rounds = create_device_rounds(prepared, upload)
        else:
            sampler = sampling.ClientSampler(
                task.train_data.client_ids, config.clients_per_round, config.sampling, config.seed
            )
        if not resuming:
            outputs.write_hparams_summary(dirs, hparams, ["eval/accuracy", "train/accuracy", "privacy/epsilon"])
            outputs.write_sample_images(dirs, _sample_images(task, config.seed))
        result = training_loop.run(
            process=process,
            sampler=sampler,
            checkpointer=outputs.Checkpointer(dirs.checkpoints),
            releaser=outputs.MetricsReleaser(dirs),
            config=config.loop,
            evaluate=evaluate,
            round_metrics=_build_round_metrics(plan, dp, config, upload, task.model_info.update_bytes, device_rounds),
            progress=ProgressPrinter(config.loop.total_rounds, stream),
            stop_requested=stop_requested,
        )
        model = task.create_keras_model()
        process.get_model_weights(result.state).assign_weights_to(model)
        model.save(dirs.model)
        outputs.write_summary_plot(dirs)
        outputs.record_hparams(dirs, hparams)
        if device_rounds is not None:
            summary = device_rounds.participation_by_tier(result.last_round)
            outputs.write_json(dirs.device_participation, summary)
            for tier, s in summary.items():
                print(
                    f"devices {tier:>4}: {s['devices']:5d} devices, selected {s['selected']:5d} times, "
                    f"updates in {s['reported']:5d} ({s['report_rate']:.0%})",
                    file=stream,
                )
    finally:
        worker.stop()
    eps = accounting.epsilon(plan, result.last_round)
    print(
        f"{'stopped' if result.stopped_early else 'finished'} at round {result.last_round}: "
        f"epsilon {eps:.4g} at delta {plan.delta:.3g} ({accounting.describe(plan)}). Outputs in {dirs.path}",
        file=stream,
        flush=True,
    )
    return result


def _build_evaluate(task: tasks.Task, config: configs.ExperimentConfig):
    eval_process = task.compose_eval(algorithms.build_evaluation_process(task.learning_model()))
    eval_state = eval_process.initialize()
    ids = sorted(task.test_data.client_ids)
    rng = np.random.default_rng([config.seed, 0xE7A1])
    eval_ids = sorted(rng.choice(ids, size=min(config.eval_clients, len(ids)), replace=False).tolist())

    def evaluate(model_weights) -> dict[str, float]:
        state = eval_process.set_model_weights(eval_state, model_weights)
        metrics = eval_process.next(state, eval_ids).metrics["client_work"]["eval"]["current_round_metrics"]
        return {f"eval/{k}": float(v) for k, v in metrics.items()}

    return evaluate


def _build_round_metrics(
    plan: accounting.PrivacyPlan,
    dp: aggregation.DpConfig,
    config: configs.ExperimentConfig,
    upload: int,
    download: int,
    device_rounds: devices.DeviceRounds | None,
):
    epsilon = accounting.EpsilonTracker(plan)

    def round_metrics(round_num: int, output, clients) -> dict[str, float]:
        metrics = {"privacy/epsilon": epsilon(round_num), "privacy/delta": plan.delta}
        if device_rounds is not None:
            metrics.update(device_rounds.outcome(round_num).metrics())
        else:
            metrics["system/bytes_up"] = float(upload * len(clients))
            metrics["system/bytes_down"] = float(download * len(clients))
        if not dp.is_private or output is None:
            return metrics
        dp_metrics = output.metrics["aggregator"].get("dp_query_metrics", {})
        clip = float(dp_metrics.get("clip", dp_metrics.get("tree_agg_dpftrl_clip", dp.clip)))
        metrics["privacy/noise_multiplier"] = dp.noise_multiplier
        metrics["privacy/clip"] = clip
        metrics["privacy/noise_stddev"] = aggregation.noise_stddev_of_mean(dp, config.clients_per_round, clip)
        if "clipped_count" in dp_metrics:
            # Not privatized: a diagnostic for the operator, never part of the DP release.
            metrics["diagnostic/clipped_fraction"] = float(dp_metrics["clipped_count"]) / len(clients)
        return metrics

    return round_metrics
