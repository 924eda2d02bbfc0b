"""The program: wires data, task, privacy plan, processes and outputs, then runs the loop.

Binaries build an `ExperimentConfig` from flags and call `run`. This module is the
only place that knows all the parts; `training_loop` only sees abstract
collaborators. Everything that can be checked is checked before any data is generated
or loaded and before the experiment directory is created (`prepare`), in this order:
the configuration (on construction), the model builder against the task, the privacy
plan against the population, the device profile file; then the data is generated or
checked, loaded, and only then is the output directory touched.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import IO

import numpy as np
import tensorflow as tf

from tffpipe import (
    accounting,
    aggregation,
    algorithms,
    audit,
    client_groups,
    configs,
    devices,
    errors,
    evaluation,
    export,
    group_evaluation,
    models,
    outputs,
    personalization,
    progress,
    runtime,
    tasks,
    training_loop,
    validation,
)
from tffpipe.data import sampling
from tffpipe.tasks import base


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything checked and built before round 1, shared by `run`, the evaluate binary and tests."""

    config: configs.ExperimentConfig
    data: tasks.DataSource
    data_dir: str
    plan: accounting.PrivacyPlan
    loop: configs.LoopConfig  # the configured rounds, cut to the privacy budget
    task: base.Task


def check(
    config: configs.ExperimentConfig, *, stop_requested: Callable[[], bool] = lambda: False
) -> tuple[tasks.DataSource, accounting.PrivacyPlan, configs.LoopConfig]:
    """The checks that need no data: model builder, privacy plan and budget, device profile file.

    Raises:
      ValueError (a `validation.ConfigError` or `models.ModelBuilderError`): naming the parameter.
      processes.Interrupted: a stop was requested while the model builder ran.
    """
    data = tasks.data_source(config)
    models.check_builder(config.model, config.task, data.num_classes, stop_requested=stop_requested)  # fits the task
    if configs.client_group_size(config) is not None:  # an explicit group size needs a model that can group
        client_groups.check_model(config, models.create_model(config.model, config.task, data.num_classes))
    plan = accounting.create_plan(
        config, data.population() + config.privacy.canaries, model_size=lambda: trainable_parameters(config, data)
    )
    loop = _within_budget(config, plan)
    if config.devices is not None and config.devices.device_profiles:
        devices.load_profiles(config.devices.device_profiles, [])  # the file parses; coverage after loading
    return data, plan, loop


def trainable_parameters(config: configs.ExperimentConfig, data: tasks.DataSource) -> int:
    """The model's trainable parameters: the dimension of one client update."""
    model = models.create_model(config.model, config.task, data.num_classes)
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def prepare(
    config: configs.ExperimentConfig,
    *,
    report: progress.Progress | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    trained: outputs.ExperimentDirs | None = None,
) -> Prepared:
    """Checks everything, then generates or checks the data and builds the task.

    With `trained` (evaluating that run's outputs), the run must have been trained with
    this configuration, which is checked before any data is generated.
    """
    report = report or progress.Progress(enabled=False)
    data, plan, loop = check(config, stop_requested=stop_requested)
    if trained is not None:
        outputs.check_trained_with(trained, recorded_hparams(config, plan))
    if data.needs_generation():
        report.line(f"generating the embedded {config.task.value} data once (cached in {config.data.cache_dir})")
    data_dir = data.prepare(progress=report.counter("data", "clients"), stop_requested=stop_requested)
    with report.phase("loading client data"):
        tf.keras.utils.set_random_seed(config.seed)  # Keras initializers draw from the global seed
        task = tasks.create_task(config, data, data_dir)
    if config.devices is not None and config.devices.device_profiles:
        devices.load_profiles(config.devices.device_profiles, task.train_data.client_ids)
    return Prepared(config=config, data=data, data_dir=data_dir, plan=plan, loop=loop, task=task)


def hparams(prepared: Prepared) -> dict:
    """The configuration as recorded: the config's own view, with the resolved noise multiplier."""
    return recorded_hparams(prepared.config, prepared.plan)


def recorded_hparams(config: configs.ExperimentConfig, plan: accounting.PrivacyPlan) -> dict:
    """`hparams` before any data is prepared: what hparams.json holds for this configuration."""
    values = config.hparams()
    values["dp.noise_multiplier"] = plan.noise_multiplier
    return values


def create_device_rounds(prepared: Prepared, upload_bytes: int) -> devices.DeviceRounds:
    """Device-model selection over the training clients, with their real example counts."""
    config, task = prepared.config, prepared.task
    ids = task.train_data.client_ids
    if config.devices.device_profiles:
        profiles = devices.load_profiles(config.devices.device_profiles, ids)
    else:
        profiles = devices.create_profiles(ids, config.seed)
    counts = prepared.data.example_counts(prepared.data_dir)
    if config.preprocess.max_examples_per_client > 0:
        counts = {cid: min(n, config.preprocess.max_examples_per_client) for cid, n in counts.items()}
    return devices.DeviceRounds(
        {cid: profiles[cid] for cid in ids},
        counts,
        clients_per_round=config.clients_per_round,
        epochs=config.preprocess.epochs,
        model_bytes=task.model_info.update_bytes,
        update_bytes=upload_bytes,
        model_parameters=task.model_info.num_parameters,
        config=config.devices,
        seed=config.seed,
    )


class ProgressPrinter:
    """One line per round: round, time, ETA, loss, accuracy, epsilon (with DP: without, it is no number)."""

    def __init__(self, total_rounds: int, stream: IO[str], *, private: bool = True):
        self._total = total_rounds
        self._private = private
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
        if self._private and "privacy/epsilon" in metrics:
            parts.append(f"eps {metrics['privacy/epsilon']:.3g}")
        print(" | ".join(parts), file=self._stream, flush=True)


def restore_model(prepared: Prepared, dirs: outputs.ExperimentDirs) -> tuple[tf.keras.Model, str]:
    """The Keras model of the latest checkpoint, restored into the process the run trained."""
    worker = runtime.install_local_context()
    try:
        process = algorithms.build_learning_process(prepared.task, prepared.config, prepared.plan)
        state, round_num = outputs.Checkpointer(dirs.checkpoints).load_latest(process.initialize())
        if state is None:
            raise outputs.OutputError(
                f"no checkpoint in {dirs.checkpoints}; train first or evaluate the exported model"
            )
        weights = process.get_model_weights(state)
    finally:
        worker.stop()
    model = prepared.task.create_keras_model()
    weights.assign_weights_to(model)
    return model, f"checkpoint of round {round_num} in {dirs.checkpoints}"


def export_experiment(
    config: configs.ExperimentConfig,
    settings: configs.ExportConfig,
    *,
    from_checkpoint: bool = False,
    model_path: str | None = None,
    out_dir: str | None = None,
) -> tuple[export.Manifest, str]:
    """Writes the TFLite files and manifest of the experiment's model (`export`); returns them and where they went.

    Args:
      settings: the variants and how much to measure.
      from_checkpoint: the latest checkpoint's weights instead of the exported model.keras.
      model_path: a .keras file instead of the experiment's (checked by the caller).
      out_dir: where the files go; None: the experiment's `export/`.
    """
    dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
    # The experiment's own model or checkpoint: only with the flags it was trained with (model_path: any file).
    prepared = prepare(config, trained=None if model_path else dirs)
    if from_checkpoint and model_path is None:
        model, where = restore_model(prepared, dirs)
    else:
        where = model_path or dirs.model
        model = evaluation.load_keras_model(where)
    spec = tasks.serving_spec(config, prepared.data_dir)
    out_dir = out_dir or dirs.export
    return export.export_for_task(model, prepared.task, spec, out_dir, source=where, config=settings), out_dir


def run(
    config: configs.ExperimentConfig,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    stream: IO[str] = sys.stdout,
    personalize: configs.PersonalizationConfig | None = None,
) -> training_loop.LoopResult:
    """Runs (or resumes) the experiment in <root_dir>/<experiment>; see `outputs` for the layout.

    With `personalize` (its `every` > 0), the evaluation's held-out clients are also
    fine-tuned and evaluated (`personalization.evaluate_task`) every `every` rounds and
    at the last; its distribution joins those rounds' metrics.

    Raises:
      validation.ConfigError: naming the parameter, before anything is written.
    """
    if personalize is not None:
        personalize.check_in_training(config)
    report = progress.Progress(stream)
    dirs = outputs.ExperimentDirs(config.root_dir, config.experiment)
    _check_not_past(dirs, config.loop.rounds, "loop.rounds")
    prepared = prepare(config, report=report, stop_requested=stop_requested)
    task, plan, loop = prepared.task, prepared.plan, prepared.loop
    _check_not_past(dirs, loop.rounds, "privacy.max_epsilon")  # the rounds the budget allows
    recorded = hparams(prepared)
    workers = create_workers(prepared, dirs)
    if workers.remote:  # an unreachable worker, or one serving other data, changes nothing
        start_workers(workers, prepared)
    resuming = outputs.prepare(dirs, recorded)
    print(
        f"{'resuming' if resuming else 'starting'} {dirs.path}: model {task.model_name} "
        f"({task.model_info.num_parameters:,} parameters, {task.model_info.update_bytes:,} bytes per update), "
        f"{len(task.train_data.client_ids)} clients{_canary_note(config)}, {config.clients_per_round} per round",
        file=stream,
        flush=True,
    )
    print(f"privacy: {accounting.describe(plan)}", file=stream, flush=True)
    if not workers.remote:
        start_workers(workers, prepared)
    try:
        # Models are created in this order since the seed was set, which fixes the initial weights.
        upload = aggregation.upload_bytes(
            task.record_specs(), config.compression, plan=plan, secure_aggregation=config.secure_aggregation
        )
        with report.phase("building the learning process"):
            built = algorithms.build_learning_process(task, config, plan)
            process = runtime.ResilientProcess(built, workers)
            evaluate = _build_evaluate(task, config, personalize, loop.rounds) if config.eval_clients > 0 else None
        note = client_groups.auto_note(config, built, task.create_keras_model)
        if note is not None:
            print(f"note: {note}", file=stream, flush=True)
        device_rounds = create_device_rounds(prepared, upload) if config.devices is not None else None
        tracker = _epsilon_tracker(plan, dirs)
        over_budget: dict[str, float] = {}  # the round the budget stops before, found while running
        # On a resume, the rounds as they were may already spend the budget: train none (the
        # loop checks its stop only after a round, which would be one round too many).
        done = outputs.last_checkpointed_round(dirs) if resuming else 0
        budget = config.privacy.max_epsilon
        if resuming and budget is not None and done < loop.rounds and tracker(done + 1) > budget:
            over_budget["round"] = done + 1
            loop = dataclasses.replace(loop, rounds=done)
        canaries = None
        if config.privacy.canaries:
            initial = audit.trainable_weights(process.initialize())
            canaries = audit.CanaryAudit(config.privacy.canaries, initial, algorithms.audit_seed(config.seed))
        if not resuming:
            outputs.write_hparams_summary(dirs, recorded, ["eval/accuracy", "train/accuracy", "privacy/epsilon"])
            outputs.write_samples(dirs, task.sample_fn(config.seed))
        result = training_loop.run(
            process=process,
            sampler=device_rounds or _create_sampler(prepared),
            checkpointer=outputs.Checkpointer(dirs.checkpoints),
            releaser=outputs.MetricsReleaser(dirs),
            config=loop,
            evaluate=evaluate,
            round_metrics=_build_round_metrics(
                prepared, upload, device_rounds, canaries, loop, workers, tracker, over_budget
            ),
            progress=ProgressPrinter(loop.rounds, stream, private=plan.is_private),
            stop_requested=lambda: stop_requested() or bool(over_budget),
            carry=canaries,
        )
        _export(process, result, prepared, dirs, recorded)
        if device_rounds is not None:
            _report_devices(device_rounds, result.last_round, dirs, stream)
        estimate = None if canaries is None else canaries.estimate(audit.trainable_weights(result.state), plan.delta)
    finally:
        workers.stop()
    eps = tracker(result.last_round)  # with the noise each round had (distributed), as released
    if estimate is not None:
        report_audit(estimate, eps, result.last_round, plan, dirs, stream)
    stop_at = int(over_budget.get("round", loop.rounds + 1)) - 1
    if stop_at < config.loop.rounds and result.last_round == stop_at:
        next_eps = tracker(stop_at + 1)  # the past rounds as they were, the next with the expected clients
        fewer = ""
        if over_budget:
            fewer = f" (its rounds noised fewer clients than the {plan.clients_per_round} planned for"
            fewer += f"; epsilon is already {eps:.4g})" if eps > config.privacy.max_epsilon else ")"
        print(
            f"stopped at round {stop_at} of {config.loop.rounds}: round {stop_at + 1} would take epsilon to "
            f"{next_eps:.4g}, past the budget max_epsilon={config.privacy.max_epsilon:g}{fewer}. Raise it to continue.",
            file=stream,
        )
    privacy = f"epsilon {eps:.4g} at delta {plan.delta:.3g} ({accounting.describe(plan)})"
    if not plan.is_private:
        privacy = f"{accounting.describe(plan)}, so no epsilon"
    print(
        f"{'stopped' if result.stopped_early else 'finished'} at round {result.last_round}: {privacy}. "
        f"Outputs in {dirs.path}",
        file=stream,
        flush=True,
    )
    return result


def create_workers(prepared: Prepared, dirs: outputs.ExperimentDirs) -> runtime.Runtime:
    settings = prepared.config.runtime
    return runtime.create(
        remote=settings.workers,
        local_workers=settings.local_workers,
        pin=settings.pin_workers,
        log_dir=dirs.path,
        retries=settings.worker_retries,
    )


def start_workers(workers: runtime.Runtime, prepared: Prepared) -> None:
    """Starts or reaches the run's workers and checks that each reads this run's data."""
    workers.start()
    for path in prepared.data.worker_files(prepared.data_dir):
        computation, here = runtime.data_fingerprint(path)
        workers.check_data(computation, here, path)


def _within_budget(config: configs.ExperimentConfig, plan: accounting.PrivacyPlan) -> configs.LoopConfig:
    """The loop's rounds, cut to the last one within max_epsilon (if a budget is set)."""
    budget = config.privacy.max_epsilon
    if budget is None:
        return config.loop
    rounds = accounting.budgeted_rounds(plan, budget, config.loop.rounds)
    return dataclasses.replace(config.loop, rounds=rounds)


def _check_not_past(dirs: outputs.ExperimentDirs, rounds: int, field: str) -> None:
    """Refuses to run an experiment already past `rounds`: it would rewrite its outputs with nothing to train.

    Raises:
      validation.ConfigError: naming `field`, what limits the rounds (rounds, or the budget).
    """
    done = outputs.last_checkpointed_round(dirs)
    if done > rounds:
        limit, fix = (
            (f"rounds={rounds}", f"give rounds >= {done} to resume or extend it")
            if field == "loop.rounds"
            else (f"the {rounds} rounds max_epsilon allows", "raise max_epsilon to continue it")
        )
        raise validation.ConfigError(
            field,
            f"experiment {dirs.path} is already at round {done}, past {limit}; nothing was changed. "
            f"Evaluate it with experiments.evaluate, or {fix}",
        )


def _canary_note(config: configs.ExperimentConfig) -> str:
    k = config.privacy.canaries
    return f" + {k} canaries (privacy audit)" if k else ""


def _create_sampler(prepared: Prepared) -> sampling.ClientSampler:
    """Sampling over the training clients and, with an audit, the canaries, which are sampled like them."""
    config = prepared.config
    ids = list(prepared.task.train_data.client_ids) + audit.canary_ids(config.privacy.canaries)
    return sampling.ClientSampler(ids, config.clients_per_round, config.sampling, config.seed)


def _export(process, result, prepared: Prepared, dirs: outputs.ExperimentDirs, recorded: dict) -> None:
    """The final model, the summary plot and the configuration the run completed with."""
    model = prepared.task.create_keras_model()
    process.get_model_weights(result.state).assign_weights_to(model)
    model.save(dirs.model)
    outputs.write_summary_plot(dirs)
    outputs.record_hparams(dirs, recorded)


def _report_devices(device_rounds: devices.DeviceRounds, rounds: int, dirs: outputs.ExperimentDirs, stream) -> None:
    summary = device_rounds.participation_by_tier(rounds)
    outputs.write_json(dirs.device_participation, summary)
    for tier, s in summary.items():
        print(
            f"devices {tier:>4}: {s['devices']:5d} devices, selected {s['selected']:5d} times, "
            f"updates in {s['reported']:5d} ({s['report_rate']:.0%})",
            file=stream,
        )


def report_audit(estimate: audit.Estimate, eps: float, rounds: int, plan, dirs: outputs.ExperimentDirs, stream) -> None:
    """audit.json, the estimate beside the accountant's epsilon, and a warning if it is surely larger."""
    outputs.write_json(dirs.audit, audit.to_json(estimate, delta=plan.delta, accountant_epsilon=eps, rounds=rounds))
    all_iterates = ""
    if estimate.epsilon_all_iterates is not None:
        all_iterates = (
            f"; all iterates {estimate.epsilon_all_iterates:.3g} (>= {estimate.epsilon_all_iterates_lower:.3g})"
        )
    print(
        f"privacy audit: empirical epsilon {estimate.epsilon_final:.3g} (final model; 95% lower bound "
        f"{estimate.epsilon_final_lower:.3g}{all_iterates}) against the accountant's {eps:.4g} at delta "
        f"{plan.delta:.3g}: a one-shot estimate from {len(estimate.final_inserted)} canaries (Andrew et al. 2024), "
        f"not a bound. Cosines in {dirs.audit}",
        file=stream,
    )
    worst = max(estimate.epsilon_final_lower, estimate.epsilon_all_iterates_lower or 0.0)
    if worst > eps:
        print(
            f"warning: the measured privacy is worse than the reported one (empirical epsilon at least {worst:.3g} "
            f"with 95% confidence, > {eps:.4g}): the mechanism does not do what the accounting assumes; "
            "do not rely on the reported epsilon.",
            file=stream,
            flush=True,
        )


def eval_client_ids(test_ids, config: configs.ExperimentConfig) -> list[str]:
    """The held-out clients every evaluation of the run uses: `eval_clients` of them, drawn once from the seed."""
    ids = sorted(test_ids)
    rng = np.random.default_rng([config.seed, 0xE7A1])
    return sorted(rng.choice(ids, size=min(config.eval_clients, len(ids)), replace=False).tolist())


def _build_evaluate(
    task: base.Task,
    config: configs.ExperimentConfig,
    personalize: configs.PersonalizationConfig | None = None,
    last_round: int | None = None,
):
    """Federated evaluation on a seeded sample of held-out clients, built on its first use.

    Besides the pooled metrics, the per-client distribution (`evaluation.client_quantiles`):
    quantile columns, and each client's values as arrays that become TensorBoard histograms.

    Building it traces the model again (about 2 s): lazily, it stays off the path to
    round 1, and a run that never evaluates never builds it.
    """
    eval_ids = eval_client_ids(task.test_data.client_ids, config)
    built = []

    def evaluate(model_weights, round_num: int) -> dict[str, float | np.ndarray]:
        if not built:
            # Per client or in groups of held-out clients, as config.client_batching says (`group_evaluation`).
            eval_process = group_evaluation.build_evaluation_process(task, config, len(eval_ids))
            built.append((eval_process, eval_process.initialize()))
        eval_process, eval_state = built[0]
        state = eval_process.set_model_weights(eval_state, model_weights)
        metrics = dict(eval_process.next(state, eval_ids).metrics["client_work"]["eval"]["current_round_metrics"])
        per_client = metrics.pop("per_client")
        values = {**{f"eval/{k}": float(v) for k, v in metrics.items()}, **evaluation.client_quantiles(per_client)}
        if (
            personalize is not None
            and personalize.every
            and (round_num % personalize.every == 0 or round_num == (last_round or config.loop.rounds))
        ):
            values.update(_personalize(task, config, personalize, model_weights, eval_ids))
        return values

    return evaluate


def _personalize(
    task: base.Task, config: configs.ExperimentConfig, settings: configs.PersonalizationConfig, model_weights, ids
) -> dict[str, float | np.ndarray]:
    """The personalization distribution of the round's model on the evaluation's clients.

    A split that leaves no client examples on both sides is reported as 0 clients, not
    raised: training goes on.
    """
    model = task.create_keras_model()
    model_weights.assign_weights_to(model)
    try:
        outcomes = personalization.evaluate_task(
            model,
            task,
            ids,
            settings,
            client_learning_rate=config.algorithm.client_learning_rate,
            batch_size=config.preprocess.batch_size,
        )
    except errors.InputError:
        return {"personalization/clients": 0.0}
    return personalization.release_values(outcomes)


def _epsilon_tracker(plan: accounting.PrivacyPlan, dirs: outputs.ExperimentDirs) -> accounting.EpsilonTracker:
    """The run's epsilon, with the clients each released round noised (read back from metrics.csv on a resume)."""
    tracker = accounting.EpsilonTracker(plan)
    if outputs.has_completed_round(dirs):
        for row in outputs.read_metrics(dirs.metrics_csv):
            if row.get("privacy/noised_clients"):
                tracker.observe(int(row["round"]), int(float(row["privacy/noised_clients"])))
    return tracker


def _build_round_metrics(
    prepared: Prepared,
    upload: int,
    device_rounds: devices.DeviceRounds | None,
    canaries: audit.CanaryAudit | None,
    loop: configs.LoopConfig,
    workers: runtime.Runtime,
    epsilon: accounting.EpsilonTracker,
    over_budget: dict[str, float],
):
    """The per-round metrics; with a budget, `over_budget` gets the next round when it would pass it.

    The plan cut the rounds to the budget with the expected clients (`_within_budget`);
    a distributed round that noised fewer takes epsilon higher than planned, so the next
    round is checked again here, from the rounds as they were.
    """
    plan, config = prepared.plan, prepared.config
    download = prepared.task.model_info.update_bytes
    budget = config.privacy.max_epsilon

    def round_metrics(round_num: int, output, clients) -> dict[str, float]:
        mechanism = {}
        if output is not None:
            mechanism = aggregation.round_metrics(
                plan, output.metrics["aggregator"], len(clients), secure_aggregation=config.secure_aggregation
            )
        # Noise that depends on who took part (distributed); a round without clients ran no
        # aggregation, but a client that had joined it would have been alone with its share.
        noised = mechanism.get("privacy/noised_clients", 0 if output is None else None)
        if noised is not None:
            epsilon.observe(round_num, int(noised))
        metrics = {"privacy/epsilon": epsilon(round_num), "privacy/delta": plan.delta}
        if budget is not None and round_num < loop.rounds and not over_budget and epsilon(round_num + 1) > budget:
            over_budget["round"] = round_num + 1
        if len(workers.workers) > 1 or config.runtime.workers:
            metrics["system/workers"] = float(len(workers.workers))
            metrics["system/worker_retries"] = float(workers.retried)
        if device_rounds is not None:
            metrics.update(device_rounds.outcome(round_num).metrics())
        else:
            metrics["system/bytes_up"] = float(upload * len(clients))
            metrics["system/bytes_down"] = float(download * len(clients))
        metrics.update(mechanism)
        if canaries is not None and output is not None:
            metrics["system/canaries"] = float(sum(audit.is_canary(c) for c in clients))
            weights = audit.trainable_weights(output.state)
            canaries.observe(weights)
            if round_num % loop.eval_every == 0 or round_num == loop.rounds:
                metrics.update(canaries.metrics(canaries.estimate(weights, plan.delta)))
        return metrics

    return round_metrics
