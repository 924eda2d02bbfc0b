"""The hand-written wire format against TensorFlow's own parser, both ways."""

import numpy as np
import pytest
import tensorflow as tf

from tffpipe.data import example_proto


def test_encoded_examples_parse_in_tensorflow():
    pixels = np.random.default_rng(0).random((28, 28), dtype=np.float32)
    blob = example_proto.encode_example({"label": [37], "pixels": pixels, "tokens": [b"hello world ."]})
    parsed = tf.train.Example.FromString(blob).features.feature
    assert list(parsed["label"].int64_list.value) == [37]
    np.testing.assert_array_equal(np.array(parsed["pixels"].float_list.value, np.float32), pixels.ravel())
    assert list(parsed["tokens"].bytes_list.value) == [b"hello world ."]


def test_examples_written_by_tensorflow_decode_the_same():
    example = tf.train.Example()
    example.features.feature["score"].int64_list.value.extend([-5, 3, 2**40])
    example.features.feature["f"].float_list.value.extend([1.5, -0.25])
    example.features.feature["tokens"].bytes_list.value.append(b"a b c")
    decoded = example_proto.decode_example(example.SerializeToString())
    assert decoded == {"score": [-5, 3, 2**40], "f": [1.5, -0.25], "tokens": [b"a b c"]}


def test_garbage_is_reported_not_crashed_on():
    with pytest.raises(example_proto.ProtoError):
        example_proto.decode_example(b"\x0a\xff\xff\xff")


_TOKENS = example_proto.encode_example({"tokens": [b"hello world ."], "score": [3]})


@pytest.mark.parametrize(
    "blob, expected",
    [
        (_TOKENS, b"hello world ."),
        (example_proto.encode_example({"tokens": [b"a", b"b"]}), None),  # two values, not one
        (example_proto.encode_example({"tokens": [1]}), None),  # an int64 list
        (example_proto.encode_example({"title": [b"x"]}), None),  # no tokens
        (_TOKENS[:-3], None),  # truncated
        (b"\x0a\x05garbage", None),  # a length past the end
    ],
)
def test_the_protobuf_fast_path_reads_one_bytes_value_as_tensorflow_does(blob, expected):
    assert example_proto.single_bytes_value(blob, "tokens") == expected
    try:
        feature = tf.train.Example.FromString(blob).features.feature.get("tokens")
    except Exception:  # noqa: BLE001  (TF's protobuf refuses it too)
        feature = None
    values = list(feature.bytes_list.value) if feature is not None else []
    assert (values[0] if len(values) == 1 and feature.WhichOneof("kind") == "bytes_list" else None) == expected
