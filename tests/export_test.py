"""TFLite export: parity with the Keras model, a crashing converter contained, the manifest's values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tffpipe import configs, export, validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = export.ServingSpec(input_shape=(32,), input_dtype="float32")
# 32 -> 64 (ReLU) -> 4: 2,048 + 64 + 256 + 4 = 2,372 parameters, 9,488 bytes in float32.
PARAMETERS = 32 * 64 + 64 + 64 * 4 + 4


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 classes around fixed centers in 32 dimensions (3 standard deviations apart per axis), y as [n, 1]."""
    centers = np.random.default_rng(0).normal(0.0, 3.0, (4, 32))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    return (centers[y] + rng.normal(0.0, 1.0, (n, 32))).astype(np.float32), y.reshape(-1, 1)


def _trained_dense_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential(
        [tf.keras.Input((32,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(4)]
    )
    model.compile(tf.keras.optimizers.Adam(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _toy(400, seed=1)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    return model


def _crash_on_full_int8(saved_model_dir: str, variant: str, representative: np.ndarray) -> bytes:
    """The converter, except that full_int8 dies as TF 2.14's calibrator does on a WHILE graph."""
    if variant == configs.ExportVariant.FULL_INT8.value:
        os.kill(os.getpid(), signal.SIGSEGV)
    return export.convert(saved_model_dir, variant, representative)


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory):
    """All three variants of the toy model, calibrated on training examples, parity on 1,000 others."""
    model = _trained_dense_model()
    out = str(tmp_path_factory.mktemp("dense") / "export")
    heldout = _toy(1000, seed=2)
    began = time.monotonic()
    manifest = export.export(
        model,
        SPEC,
        out,
        model_name="dense",
        source="test",
        representative=_toy(100, seed=3)[0],
        heldout=heldout,
        config=configs.ExportConfig(latency_runs=20),
    )
    print(f"dense export: {time.monotonic() - began:.1f} s")
    return model, manifest, out, heldout


def test_float32_predicts_what_keras_predicts_and_int8_within_its_tolerance(dense_export):
    model, manifest, out, (x, y) = dense_export
    keras_accuracy = float(np.mean(model.predict(x, verbose=0).argmax(-1) == y[:, 0]))
    assert manifest.keras.accuracy == pytest.approx(keras_accuracy)
    assert keras_accuracy > 0.95  # the toy is learned, so agreement is measured on confident predictions
    v = manifest.variants
    assert v["float32"]["argmax_agreement"] >= 0.999
    assert v["float32"]["accuracy_delta"] == pytest.approx(0.0, abs=1e-3)
    # int8 keeps 255 levels over each tensor's range: a prediction can only flip where the top two
    # logits lie within a few levels of each other, which on this learned, well separated toy is
    # rare (measured: 100% agreement for both); 1% leaves room for another TF's rounding.
    for name in ("dynamic_int8", "full_int8"):
        assert v[name]["argmax_agreement"] >= 0.99, name
        assert abs(v[name]["accuracy_delta"]) <= 0.01, name
    # and the files hold what the manifest says: the float32 file predicts as the model does
    with open(os.path.join(out, "model_float32.tflite"), "rb") as f:
        logits = export.tflite_logits(f.read(), x[:50])
    np.testing.assert_allclose(logits, model.predict(x[:50], verbose=0), rtol=1e-4, atol=1e-4)


def test_sizes_ops_and_signature_follow_from_the_model(dense_export):
    _, manifest, out, _ = dense_export
    v = manifest.variants
    for name, entry in v.items():
        assert os.path.getsize(os.path.join(out, entry["file"])) == entry["bytes"], name
    # float32: 2,372 parameters x 4 bytes, plus the flatbuffer's structure (under 4 KB here).
    assert 4 * PARAMETERS < v["float32"]["bytes"] < 4 * PARAMETERS + 4096
    # dynamic range: the 2,048-weight kernel becomes int8 (6,144 bytes fewer); the 256-weight one stays
    # float32, below TFLite's 1,024-element threshold for quantizing a weight.
    assert v["float32"]["bytes"] - v["dynamic_int8"]["bytes"] == pytest.approx(3 * 2048, abs=256)
    # full integer: both kernels int8 (2,304 bytes), biases int32 (272 bytes), plus structure.
    assert v["full_int8"]["bytes"] < v["float32"]["bytes"] - 3 * (2048 + 256) + 1024
    assert v["float32"]["ops"] == {"FULLY_CONNECTED": 2}  # the ReLU is fused into the first
    assert v["full_int8"]["ops"] == {"DEQUANTIZE": 1, "FULLY_CONNECTED": 2, "QUANTIZE": 1}
    for name in v:
        assert v[name]["inputs"] == {"input": {"shape": [1, 32], "dtype": "float32"}}, name
        assert v[name]["outputs"] == {"logits": {"shape": [1, 4], "dtype": "float32"}}, name
        assert 0 < v[name]["latency_ms"] < 50, name
        assert v[name]["unrolled"] is False


def test_the_manifest_is_written_as_json_and_a_tensorboard_text_summary(dense_export):
    _, manifest, out, _ = dense_export
    with open(os.path.join(out, export.MANIFEST)) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(manifest.to_json()))
    assert written["parity_examples"] == 1000 and written["counted"] == 1000
    assert written["representative_examples"] == 100 and written["latency_runs"] == 20
    assert sorted(os.listdir(out)) == [
        "manifest.json",
        "model_dynamic_int8.tflite",
        "model_float32.tflite",
        "model_full_int8.tflite",
        "tensorboard",
    ]
    table = manifest.table().splitlines()
    assert len(table) == 2 + 2 + 3  # title, blank, header, separator, one row per variant
    assert table[-1].startswith("| full_int8 | model_full_int8.tflite | ")
    texts = []
    for name in os.listdir(os.path.join(out, export.TENSORBOARD)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(out, export.TENSORBOARD, name)):
            for value in event.summary.value:
                if value.tag == "export/manifest":
                    texts.append(tf.make_ndarray(value.tensor).item().decode())
    assert texts == [manifest.table()]


def test_a_crashing_converter_costs_only_its_variant(tmp_path):
    out = str(tmp_path / "export")
    x, y = _toy(50, seed=2)
    manifest = export.export(
        _trained_dense_model(),
        SPEC,
        out,
        model_name="dense",
        source="test",
        representative=x,
        heldout=(x, y),
        config=configs.ExportConfig(variants=(configs.ExportVariant.FULL_INT8, configs.ExportVariant.FLOAT32)),
        converter=_crash_on_full_int8,
    )
    assert manifest.failures == ["full_int8: conversion failed: ChildDied: killed by SIGSEGV"]
    assert "model_full_int8.tflite" not in os.listdir(out)
    assert manifest.variants["float32"]["argmax_agreement"] == 1.0  # converted after the crash
    with open(os.path.join(out, export.MANIFEST)) as f:
        assert json.load(f)["variants"]["full_int8"] == {"error": "conversion failed: ChildDied: killed by SIGSEGV"}


def test_scores_count_only_the_targets_the_task_scores():
    logits = np.array([[[1.0, 2.0, 0.0], [3.0, 0.0, 0.5], [0.0, 0.2, 1.0]]])  # argmax 1, 0, 2
    y = np.array([[1, 1, 0]])
    spec = export.ServingSpec(input_shape=(3,), input_dtype="int64", ignored_targets=(0,), top_k=2)
    # target 0 is ignored: positions 0 and 1 count; argmax right at 0 only; top-2 of position 1 is {0, 2}.
    assert export.score(logits, y, spec) == export.Scores(counted=2, accuracy=0.5, top_k_accuracy=0.5)
    other = logits.copy()
    other[0, 1] = [0.0, 3.0, 0.0]  # changes position 1's argmax; position 2 is not scored
    other[0, 2] = [5.0, 0.0, 0.0]
    assert export.argmax_agreement(logits, other, y, spec) == 0.5


def test_variants_are_named_and_unknown_ones_refused():
    assert configs.export_variants(["full_int8", "float32", "full_int8"]) == (
        configs.ExportVariant.FULL_INT8,
        configs.ExportVariant.FLOAT32,
    )
    with pytest.raises(validation.ConfigError, match=r"unknown variant 'int4'; choose among \['float32'") as e:
        configs.export_variants(["float32", "int4"])
    assert e.value.field == "variants"
    with pytest.raises(validation.ConfigError, match="latency_runs must be >= 1"):
        configs.ExportConfig(latency_runs=0)


def test_the_keyboard_vocabulary_file_names_every_id_and_its_scoring_masks_tffs_tokens():
    from tffpipe.tasks.keyboard import serving

    text = configs.TextConfig(vocab_size=3, num_oov_buckets=2)
    # TFF's ids: pad 0, words 1..3, out of vocabulary 4..5, beginning 6, end 7.
    assert serving.vocabulary_lines(text, ["the", "to", "a"]) == [
        "<pad>",
        "the",
        "to",
        "a",
        "<oov1>",
        "<oov2>",
        "<bos>",
        "<eos>",
    ]
    assert sorted(serving.task.masked_for_accuracy(text)) == [0, 4, 5, 7]


def test_the_keyboard_lstm_is_unrolled_for_full_int8_and_keeps_its_loop_in_float32(tmp_path):
    from tffpipe import models

    tf.keras.utils.set_random_seed(0)
    model = models.create_cifg_lstm(30)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, (40, 7))
    spec = export.ServingSpec(input_shape=(6,), input_dtype="int64", input_name="ids", ignored_targets=(0,), top_k=3)
    began = time.monotonic()
    manifest = export.export(
        model,
        spec,
        str(tmp_path / "export"),
        model_name="cifg_lstm",
        source="untrained",
        representative=ids[:20, :6],
        heldout=(ids[20:, :6], ids[20:, 1:]),
        config=configs.ExportConfig(variants=(configs.ExportVariant.FLOAT32, configs.ExportVariant.FULL_INT8)),
    )
    print(f"cifg_lstm export: {time.monotonic() - began:.1f} s")
    float32, full_int8 = manifest.variants["float32"], manifest.variants["full_int8"]
    assert "WHILE" in float32["ops"] and not float32["unrolled"]
    assert "WHILE" not in full_int8["ops"] and full_int8["unrolled"]
    assert float32["argmax_agreement"] == 1.0 and float32["top_k_accuracy_delta"] == pytest.approx(0.0)
    assert float32["inputs"] == {"ids": {"shape": [1, 6], "dtype": "int64"}}
    assert float32["outputs"] == {"logits": {"shape": [1, 6, 30], "dtype": "float32"}}
    assert manifest.counted == 20 * 6  # no padding among random ids 1..29


def test_the_binary_refuses_bad_input_with_one_line_and_writes_nothing(forks, tmp_path):
    runs = tmp_path / "runs"
    (runs / "default").mkdir(parents=True)
    cases = [
        (["--variants=float32,int4"], "--variants=float32,int4: unknown variant 'int4'"),
        (["--parity_examples=0"], "--parity_examples=0: parity_examples must be >= 1"),
        (["--experiment=absent"], "no Keras model file at"),
        ([f"--model_path={tmp_path}/m.keras", f"--export_dir={tmp_path}"], "holds files but no manifest.json"),
    ]
    (tmp_path / "m.keras").write_text("not checked before the export directory")
    # Forked from one process that imported TF (tests/forkserver.py); one that went on (a check
    # missing) would generate data for minutes, so it is killed after 120 s.
    args = [[f"--root_dir={runs}", f"--cache_dir={tmp_path}/cache", *a] for a, _ in cases]
    for proc, (_, expected) in zip(forks.run([("export", a) for a in args], timeout=120), cases, strict=True):
        err = proc.stderr
        assert proc.returncode == 2, err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
        assert proc.stdout == ""
    assert os.listdir(runs / "default") == [] and not os.path.exists(tmp_path / "cache")
    assert sorted(os.listdir(tmp_path)) == ["m.keras", "runs"]  # the directory it refused to replace is intact


def test_the_binary_exports_a_model_file_with_emnist_pixels_in(tmp_path, tiny_data_dir):
    from tffpipe import models

    path = tmp_path / "linear.keras"
    models.create_model("linear", configs.Task.EMNIST, 62).save(path)
    tiny = ["--num_writers=12", "--median_examples=24", "--data_seed=7", "--model=linear", "--clients_per_round=3"]
    cache = os.path.dirname(tiny_data_dir)
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--root_dir={tmp_path}/runs", f"--cache_dir={cache}", *tiny]
        + [f"--model_path={path}", f"--export_dir={out}", "--variants=float32", "--latency_runs=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert sorted(os.listdir(out)) == ["manifest.json", "model_float32.tflite", "tensorboard"]
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    float32 = manifest["variants"]["float32"]
    assert float32["inputs"] == {"pixels": {"shape": [1, 28, 28], "dtype": "float32"}}  # EMNIST's own pixels
    assert float32["outputs"] == {"logits": {"shape": [1, 62], "dtype": "float32"}}
    assert float32["ops"] == {"FULLY_CONNECTED": 1, "RESHAPE": 1, "SUB": 1}  # 1 - pixels, flatten, the layer
    assert float32["argmax_agreement"] == 1.0 and manifest["counted"] == manifest["parity_examples"]
    assert manifest["source"] == str(path)
    assert "| float32 | model_float32.tflite | " in done.stdout
