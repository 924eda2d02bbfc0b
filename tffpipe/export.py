"""What reaches the phone: TFLite variants of a trained Keras model, their parity and a manifest (no TFF).

From a trained Keras model and its task's `ServingSpec` (the serving signature with
the task's preprocessing folded in, how predictions are scored, files the phone
needs beside the model), `export` writes

  model_float32.tflite        the model as trained
  model_dynamic_int8.tflite   weights in int8, activations in float (dynamic-range quantization)
  model_full_int8.tflite      weights and activations in int8, calibrated on training clients' examples
  <the spec's files>          the keyboard's vocabulary: what each id means
  manifest.json               per variant: size, ops, signature, latency, parity with the Keras model
  tensorboard/                the manifest's table as a TensorBoard text summary

all with TFLite's builtin ops only (no Select TF ops, which a phone app would have to
ship), and the batch fixed to 1, one example per call as a phone runs it.

Each converter runs in a child process (`processes.call_in_child`): TF 2.14's int8
calibrator segfaults on the WHILE loop of a recurrent model (tensorflow/tensorflow#75140),
and a crash must cost only its own variant. Recurrent models are therefore unrolled over
the task's fixed sequence length for full-integer quantization.

Parity is measured on held-out clients' examples: the share of predictions (the
positions the task scores) where the TFLite file's argmax equals the Keras model's,
and both accuracies (top-k too where the task shows k suggestions). Representative
data for calibration comes from training clients only, so parity is not measured on
the data the quantization was fitted to.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tffpipe import configs, errors, processes

MANIFEST = "manifest.json"
TENSORBOARD = "tensorboard"  # the manifest's table as a TensorBoard text summary
_DEFAULT_CONFIG = configs.ExportConfig()


Variant = configs.ExportVariant


def filename(variant: Variant) -> str:
    return f"model_{variant.value}.tflite"


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """What a task's phone model takes, and how its predictions are scored.

    Attributes:
      input_shape: one example's input, without the batch (fixed to 1 on the phone).
      input_dtype: its dtype name (`float32`, `int64`).
      input_name: the serving signature's input name.
      preprocess: what the phone would otherwise do before the model, folded into the
        served graph (tensor -> the Keras model's input); None: the input as it is.
      to_serving_input: maps a batch of the Keras model's inputs back to what the phone
        gives (the inverse of `preprocess`), for parity on held-out data.
      ignored_targets: target ids that are not scored (the keyboard's padding, end of
        sentence, out-of-vocabulary ids), as the task's accuracy masks them.
      top_k: also score "the target is among the k highest logits" (k > 1; 1: argmax only).
      files: name -> text of files written beside the model (the keyboard's vocabulary).
    """

    input_shape: tuple[int, ...]
    input_dtype: str
    input_name: str = "input"
    preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None
    to_serving_input: Callable[[np.ndarray], np.ndarray] | None = None
    ignored_targets: tuple[int, ...] = ()
    top_k: int = 1
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)


def examples_from_clients(
    client_data, client_ids: Sequence[str], limit: int, *, per_client: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` examples (x, y) of `client_ids` in order, at most `per_client` from each.

    `client_data` is a ClientData of batches, {x, y} mappings (EMNIST) or (x, y) tuples
    (the keyboard).

    Raises:
      errors.InputError: the clients hold no example.
    """
    xs, ys, count = [], [], 0
    for cid in client_ids:
        taken = 0
        for batch in client_data.create_tf_dataset_for_client(cid):
            x, y = (batch["x"], batch["y"]) if isinstance(batch, Mapping) else batch
            room = min(limit - count, len(x) if per_client is None else per_client - taken)
            xs.append(x.numpy()[:room])
            ys.append(y.numpy()[:room])
            taken += len(xs[-1])
            count += len(xs[-1])
            if count >= limit:
                return np.concatenate(xs), np.concatenate(ys)
            if per_client is not None and taken >= per_client:
                break
    if count == 0:
        raise errors.InputError(f"the {len(client_ids)} clients given hold no example to export with")
    return np.concatenate(xs), np.concatenate(ys)


def has_recurrent_layers(model: tf.keras.Model) -> bool:
    return any(isinstance(m, tf.keras.layers.RNN) for m in model.submodules)


def unrolled(model: tf.keras.Model, input_shape: Sequence[int], input_dtype: str) -> tf.keras.Model:
    """The model with its recurrent layers unrolled over a fixed input shape (batch 1), same weights.

    Unrolled, a recurrent layer is a chain of builtin ops without a WHILE loop, which
    the int8 calibrator handles; its size grows with the sequence length.
    """

    def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, tf.keras.layers.RNN):
            config["unroll"] = True
        return layer.__class__.from_config(config)

    inputs = tf.keras.Input(batch_shape=(1, *input_shape), dtype=input_dtype)
    clone = tf.keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def _saved_serving_model(model: tf.keras.Model, spec: ServingSpec, directory: str) -> str:
    """Saves `spec.preprocess` then `model` as a SavedModel with one fixed signature (batch 1).

    The converter then runs in a child that needs neither Keras nor the model's code.
    The variables are tracked directly, which skips Keras' own saving (slow for an LSTM).
    """
    signature = tf.TensorSpec([1, *spec.input_shape], tf.as_dtype(spec.input_dtype), name=spec.input_name)

    @tf.function(input_signature=[signature])
    def serve(x):
        if spec.preprocess is not None:
            x = spec.preprocess(x)
        return {"logits": model(x, training=False)}

    module = tf.Module()
    module.variables_ = list(model.variables)
    module.serve = serve
    tf.saved_model.save(module, directory, signatures={"serving_default": serve.get_concrete_function()})
    return directory


def convert(saved_model_dir: str, variant: str, representative: np.ndarray | None) -> bytes:
    """One TFLite variant of a SavedModel, builtin ops only (run in a child: it may crash)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant in (Variant.DYNAMIC_INT8.value, Variant.FULL_INT8.value):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == Variant.FULL_INT8.value:
        # Integer kernels for every op; the float (or id) input and float output stay, with
        # (de)quantization at the edges, so every variant keeps the same signature.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: ([representative[i : i + 1]] for i in range(len(representative)))
    with _quiet_native_output():  # the converter's C++ prints; its errors still come back as exceptions
        return converter.convert()


@contextlib.contextmanager
def _quiet_native_output():
    """Sends this process's stdout and stderr (file descriptors 1 and 2, where C++ writes) to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Predictions scored against targets: accuracy, top-k accuracy."""

    counted: int
    accuracy: float
    top_k_accuracy: float | None


def _flat(logits: np.ndarray, y: np.ndarray, ignored: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[examples, ..., classes] logits and [examples, ...] targets -> the scored positions only."""
    logits = logits.reshape(-1, logits.shape[-1])
    y = y.reshape(-1)
    keep = ~np.isin(y, list(ignored))
    return logits[keep], y[keep]


def score(logits: np.ndarray, y: np.ndarray, spec: ServingSpec) -> Scores:
    logits, y = _flat(logits, y, spec.ignored_targets)
    accuracy = float(np.mean(logits.argmax(-1) == y)) if len(y) else float("nan")
    top_k = None
    if spec.top_k > 1:
        best = np.argsort(-logits, axis=-1, kind="stable")[:, : spec.top_k]
        top_k = float(np.mean((best == y[:, None]).any(-1))) if len(y) else float("nan")
    return Scores(counted=len(y), accuracy=accuracy, top_k_accuracy=top_k)


def argmax_agreement(a: np.ndarray, b: np.ndarray, y: np.ndarray, spec: ServingSpec) -> float:
    """The share of scored positions where both logits' argmax is the same."""
    a, kept = _flat(a, y, spec.ignored_targets)
    b, _ = _flat(b, y, spec.ignored_targets)
    return float(np.mean(a.argmax(-1) == b.argmax(-1))) if len(kept) else float("nan")


def keras_logits(model: tf.keras.Model, x: np.ndarray, batch_size: int = 100) -> np.ndarray:
    predict = tf.function(lambda v: model(v, training=False), reduce_retracing=True)
    return np.concatenate([predict(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)])


def _interpreter(content: bytes, *, delegates: bool = True) -> tf.lite.Interpreter:
    """One thread; with TFLite's default delegate (XNNPACK), as an app gets it, unless `delegates` is False."""
    resolver = tf.lite.experimental.OpResolverType
    with _quiet_native_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        interpreter = tf.lite.Interpreter(
            model_content=content,
            num_threads=1,
            experimental_op_resolver_type=resolver.AUTO if delegates else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
    return interpreter


def tflite_logits(content: bytes, inputs: np.ndarray) -> np.ndarray:
    """The file's outputs for each example, one call per example (batch 1, as on the phone)."""
    interpreter = _interpreter(content)
    runner = interpreter.get_signature_runner("serving_default")
    name = next(iter(interpreter.get_signature_list()["serving_default"]["inputs"]))
    return np.concatenate([runner(**{name: inputs[i : i + 1]})["logits"] for i in range(len(inputs))])


def latency_ms(content: bytes, inputs: np.ndarray, runs: int) -> float:
    """Median over `runs` calls of one example's inference, in ms, on 1 thread (after one warm-up call)."""
    interpreter = _interpreter(content)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, inputs[:1])
    interpreter.invoke()
    times = []
    for i in range(runs):
        interpreter.set_tensor(index, inputs[i % len(inputs) : i % len(inputs) + 1])
        began = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - began)
    return 1000.0 * statistics.median(times)


def describe_file(content: bytes) -> dict[str, Any]:
    """Ops (builtin op name -> count) and the input/output signature of a TFLite file."""
    interpreter = _interpreter(content, delegates=False)  # the file's own ops, not XNNPACK's DELEGATE node
    # `_get_ops_details` is the interpreter's only op listing in TF 2.14 (the analyzer only prints).
    ops = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())

    runner = interpreter.get_signature_runner("serving_default")

    def tensors(details: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, d in details.items():
            entry = {"shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
            scale, zero_point = d["quantization"]
            if scale:
                entry["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
            out[name] = entry
        return out

    return {
        "ops": dict(sorted(ops.items())),
        "inputs": tensors(runner.get_input_details()),
        "outputs": tensors(runner.get_output_details()),
    }


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an export wrote and measured; `to_json` is manifest.json."""

    model: str
    source: str
    parity_examples: int
    counted: int  # scored predictions (examples, or unmasked tokens)
    representative_examples: int
    latency_runs: int
    keras: Scores
    top_k: int
    variants: dict[str, dict[str, Any]]  # name -> measurements, or {"error": ...}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {v['error']}" for name, v in self.variants.items() if "error" in v]

    def table(self) -> str:
        """A README-style Markdown table, one row per variant."""
        k = self.top_k
        head = ["variant", "file", "size", f"latency (median of {self.latency_runs}, 1 thread)", "argmax agreement"]
        head += ["accuracy (vs Keras)"] + ([f"top-{k} (vs Keras)"] if k > 1 else []) + ["ops"]
        rows = [head, ["---"] * len(head)]
        for name, v in self.variants.items():
            if "error" in v:
                rows.append([name, "failed", v["error"], *[""] * (len(head) - 3)])
                continue
            row = [name, v["file"], f"{v['bytes'] / 1e6:.2f} MB", f"{v['latency_ms']:.3f} ms"]
            row += [f"{v['argmax_agreement']:.2%}", f"{v['accuracy']:.4f} ({v['accuracy_delta']:+.4f})"]
            if k > 1:
                row.append(f"{v['top_k_accuracy']:.4f} ({v['top_k_accuracy_delta']:+.4f})")
            row.append(", ".join(v["ops"]))
            rows.append(row)
        keras = f"Keras model: accuracy {self.keras.accuracy:.4f}"
        if k > 1:
            keras += f", top-{k} {self.keras.top_k_accuracy:.4f}"
        lines = [
            f"{self.model} from {self.source}; parity on {self.parity_examples:,} held-out examples "
            f"({self.counted:,} scored predictions); {keras}",
            "",
        ]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def export(
    model: tf.keras.Model,
    spec: ServingSpec,
    out_dir: str,
    *,
    model_name: str,
    source: str,
    representative: np.ndarray,
    heldout: tuple[np.ndarray, np.ndarray],
    config: configs.ExportConfig = _DEFAULT_CONFIG,
    converter: Callable[..., bytes] | None = None,
) -> Manifest:
    """Writes the TFLite `variants` of `model` and the manifest into `out_dir` (replaced as a whole).

    Args:
      model: the trained Keras model (any batch size).
      spec: the task's serving signature and scoring.
      out_dir: where the files go; written beside it first and renamed into place, so a
        failure leaves the previous export as it was. It must be new, empty or a previous
        export (`check_out_dir`).
      representative: serving inputs (one per row) from training clients, for int8 calibration.
      heldout: (x, y) of held-out clients, x as the Keras model takes it, for parity and latency.
      config: the variants and how much to measure (its example counts are the caller's to apply).
      converter: `(saved_model_dir, variant name, representative) -> bytes`, called through
        `processes.call_in_child`; by default `convert`. Tests pass one that crashes.

    Returns:
      The manifest; a variant whose conversion failed or crashed holds {"error": ...}
      and has no file; the others are written.
    """
    check_out_dir(out_dir)
    x, y = heldout
    serving_x = spec.to_serving_input(x) if spec.to_serving_input is not None else x
    expected = (len(x), *spec.input_shape)
    if serving_x.shape != expected:
        raise errors.InputError(f"held-out inputs have shape {serving_x.shape}, the serving signature {expected}")
    try:
        keras_out = keras_logits(model, x)
    except Exception as e:  # noqa: BLE001  (Keras raises many types on inputs a model does not take)
        raise errors.InputError(
            f"model {model_name!r} does not take the task's inputs of shape {x.shape[1:]} "
            f"({type(e).__name__}: {_first_line(e)}); export a model trained for this task"
        ) from e
    if keras_out.shape[:-1] != y.shape[: keras_out.ndim - 1]:  # [B, C] for y [B, 1]; [B, T, V] for y [B, T]
        raise errors.InputError(
            f"model {model_name!r} outputs shape {keras_out.shape[1:]} for targets of shape {y.shape[1:]}; "
            "export a model trained for this task"
        )
    keras_scores = score(keras_out, y, spec)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        saved = {}
        results: dict[str, dict[str, Any]] = {}
        for variant in config.variants:
            unroll = variant is Variant.FULL_INT8 and has_recurrent_layers(model)
            if unroll not in saved:
                served = (
                    unrolled(model, _model_input_shape(model, spec), _model_input_dtype(model)) if unroll else model
                )
                saved[unroll] = _saved_serving_model(served, spec, os.path.join(staging, f".saved_model_{unroll:d}"))
            try:
                content = processes.call_in_child(converter or convert, saved[unroll], variant.value, representative)
            except Exception as e:  # noqa: BLE001  (a converter's failure costs its own variant only)
                results[variant.value] = {"error": f"conversion failed: {type(e).__name__}: {_first_line(e)}"}
                continue
            with open(os.path.join(staging, filename(variant)), "wb") as f:
                f.write(content)
            out = tflite_logits(content, serving_x)
            scores = score(out, y, spec)
            entry = {"file": filename(variant), "bytes": len(content), "unrolled": unroll, **describe_file(content)}
            entry["latency_ms"] = latency_ms(content, serving_x, config.latency_runs)
            entry["argmax_agreement"] = argmax_agreement(out, keras_out, y, spec)
            entry["accuracy"] = scores.accuracy
            entry["accuracy_delta"] = scores.accuracy - keras_scores.accuracy
            if spec.top_k > 1:
                entry["top_k_accuracy"] = scores.top_k_accuracy
                entry["top_k_accuracy_delta"] = scores.top_k_accuracy - keras_scores.top_k_accuracy
            results[variant.value] = entry
        for name, text in spec.files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write(text)
        manifest = Manifest(
            model=model_name,
            source=source,
            parity_examples=len(x),
            counted=keras_scores.counted,
            representative_examples=len(representative),
            latency_runs=config.latency_runs,
            keras=keras_scores,
            top_k=spec.top_k,
            variants=results,
        )
        for name in list(os.listdir(staging)):
            if name.startswith(".saved_model_"):
                shutil.rmtree(os.path.join(staging, name))
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest.to_json(), f, indent=2)
            f.write("\n")
        writer = tf.summary.create_file_writer(os.path.join(staging, TENSORBOARD))
        with writer.as_default():
            tf.summary.text("export/manifest", manifest.table(), step=0)
        writer.close()
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _model_input_shape(model: tf.keras.Model, spec: ServingSpec) -> tuple[int, ...]:
    """The Keras model's input shape for one example: the serving shape after `spec.preprocess`."""
    if spec.preprocess is None:
        return tuple(spec.input_shape)
    example = tf.zeros([1, *spec.input_shape], tf.as_dtype(spec.input_dtype))
    return tuple(spec.preprocess(example).shape[1:])


def _model_input_dtype(model: tf.keras.Model) -> str:
    return tf.as_dtype(model.inputs[0].dtype).name


def check_out_dir(out_dir: str) -> None:
    """An export replaces `out_dir` as a whole: refuse anything but a previous export or an empty directory.

    Raises:
      errors.InputError: `out_dir` is a file, or a directory holding something else.
    """
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise errors.InputError(f"{out_dir} exists and is not a directory; choose another export directory")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise errors.InputError(
            f"{out_dir} holds files but no {MANIFEST}: it is not a previous export, and an export replaces its "
            "directory as a whole; choose an empty or new export directory"
        )


def _replace(staging: str, out_dir: str) -> None:
    """Moves `staging` to `out_dir`, replacing a previous export only once the new one is complete."""
    old = None
    if os.path.exists(out_dir):
        old = out_dir.rstrip("/") + f".old-{os.getpid()}"
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def export_for_task(
    model: tf.keras.Model,
    task,
    spec: ServingSpec,
    out_dir: str,
    *,
    source: str,
    config: configs.ExportConfig = _DEFAULT_CONFIG,
    converter: Callable[..., bytes] | None = None,
) -> Manifest:
    """`export` with a task's data: calibration on training clients, parity on held-out ones.

    Calibration takes at most `_REPRESENTATIVE_CLIENTS`-th of its examples from each
    training client (in id order), so it sees many writers or users; parity takes the
    held-out clients' examples in id order.

    Args:
      task: a `tasks.base.Task` (its `train_data`, `test_data` and `model_name`).
    """
    per_client = max(1, -(-config.representative_examples // _REPRESENTATIVE_CLIENTS))
    train_ids = sorted(task.train_data.client_ids)
    rep_x, _ = examples_from_clients(task.train_data, train_ids, config.representative_examples, per_client=per_client)
    representative = spec.to_serving_input(rep_x) if spec.to_serving_input is not None else rep_x
    heldout = examples_from_clients(task.test_data, sorted(task.test_data.client_ids), config.parity_examples)
    return export(
        model,
        spec,
        out_dir,
        model_name=task.model_name,
        source=source,
        representative=representative,
        heldout=heldout,
        config=config,
        converter=converter,
    )


_REPRESENTATIVE_CLIENTS = 50  # calibration spreads over at least this many training clients
