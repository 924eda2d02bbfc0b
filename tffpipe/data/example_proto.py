"""`tf.train.Example` in protobuf wire format, written and read without TensorFlow.

The generators write examples from worker processes that should not load TF, and the
file checks read a sample of a user's file before TF is imported, so both speak the
wire format directly. Only what `tf.train.Example` uses: `Features` is a map from
name to `Feature`, a one-of of `BytesList` (1), `FloatList` (2) and `Int64List` (3);
lists may be packed or not, as the protobuf runtime writes either. The test suite
checks both directions against TF's own parser.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence

import numpy as np

_BYTES, _FLOAT, _INT64 = 1, 2, 3


class ProtoError(ValueError):
    """Bytes that are not a well-formed tf.train.Example."""


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: Mapping[str, np.ndarray | Sequence[int] | Sequence[bytes]]) -> bytes:
    """Serializes {name: values}: float arrays as FloatList, integers as Int64List, bytes as BytesList."""
    entries = b""
    for name, values in features.items():
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            feature = _field(_FLOAT, _field(1, values.astype("<f4").ravel().tobytes()))
        elif all(isinstance(v, bytes) for v in values) and len(values):
            feature = _field(_BYTES, b"".join(_field(1, v) for v in values))
        else:
            feature = _field(_INT64, _field(1, b"".join(_varint(int(v)) for v in values)))
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))
    return _field(1, entries)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, payload) of one message's top-level fields."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            out.append((number, wire, value))
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise ProtoError("a field runs past the end of the message")
            out.append((number, wire, data[pos : pos + length]))
            pos += length
        elif wire == 5:
            out.append((number, wire, data[pos : pos + 4]))
            pos += 4
        elif wire == 1:
            out.append((number, wire, data[pos : pos + 8]))
            pos += 8
        else:
            raise ProtoError(f"unsupported wire type {wire}")
    return out


def _decode_feature(data: bytes) -> list:
    values: list = []
    for kind, _, payload in _fields(data):
        if not isinstance(payload, bytes):
            raise ProtoError("a Feature holds a varint where a list belongs")
        for number, wire, item in _fields(payload):
            if number != 1:
                continue
            if kind == _BYTES:
                values.append(item)
            elif kind == _FLOAT:
                values.extend(struct.unpack(f"<{len(item) // 4}f", item))  # a packed run or one fixed32
            elif kind == _INT64:
                if wire == 0:
                    values.append(item - (1 << 64) if item >= 1 << 63 else item)
                else:
                    pos = 0
                    while pos < len(item):
                        value, pos = _read_varint(item, pos)
                        values.append(value - (1 << 64) if value >= 1 << 63 else value)
    return values


def decode_example(data: bytes) -> dict[str, list]:
    """{feature name: list of values} of one serialized tf.train.Example."""
    features: dict[str, list] = {}
    for number, _, features_msg in _fields(data):
        if number != 1 or not isinstance(features_msg, bytes):
            continue
        for entry_number, _, entry in _fields(features_msg):
            if entry_number != 1 or not isinstance(entry, bytes):
                continue
            name, value = None, b""
            for k, _, v in _fields(entry):
                if k == 1 and isinstance(v, bytes):
                    name = v.decode("utf-8", errors="replace")
                elif k == 2 and isinstance(v, bytes):
                    value = v
            if name is not None:
                features[name] = _decode_feature(value)
    return features


@functools.cache
def _protobuf_example_class():
    """`tf.train.Example` as a class of the protobuf package, built from its descriptor; None without the package.

    The package's C parser (upb) reads an example several times faster than
    `decode_example`, which counts when every row of a large file is checked, and needs
    no TensorFlow: the message is declared here, in a pool of its own, as TF's
    `example.proto` and `feature.proto` declare it.
    """
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError:
        return None
    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(name="tffpipe/example.proto", package="tffpipe.wire", syntax="proto3")
    for name, kind in (
        ("BytesList", field.TYPE_BYTES),
        ("FloatList", field.TYPE_FLOAT),
        ("Int64List", field.TYPE_INT64),
    ):
        proto.message_type.add(name=name).field.add(name="value", number=1, type=kind, label=repeated)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, name in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
        type_name = f".tffpipe.wire.{name.title().replace('_', '')}"
        feature.field.add(
            name=name, number=number, type=field.TYPE_MESSAGE, label=optional, type_name=type_name, oneof_index=0
        )
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=field.TYPE_MESSAGE, label=optional, type_name=".tffpipe.wire.Feature")
    features.field.add(
        name="feature",
        number=1,
        type=field.TYPE_MESSAGE,
        label=repeated,
        type_name=".tffpipe.wire.Features.FeatureEntry",
    )
    example = proto.message_type.add(name="Example")
    example.field.add(
        name="features", number=1, type=field.TYPE_MESSAGE, label=optional, type_name=".tffpipe.wire.Features"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tffpipe.wire.Example"))


def single_bytes_value(data: bytes, name: str) -> bytes | None:
    """The one bytes value of feature `name`, if `data` is a well-formed tf.train.Example holding exactly that.

    None otherwise, or without the protobuf package: then `decode_example` tells what is
    there. A fast path for checks that read every row.
    """
    example_class = _protobuf_example_class()
    if example_class is None:
        return None
    try:
        example = example_class.FromString(data)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError, or whatever its C parser raises)
        return None
    feature = example.features.feature.get(name)
    if feature is None or feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
        return None
    return feature.bytes_list.value[0]
