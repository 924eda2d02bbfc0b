"""`tf.train.Example` in protobuf wire format, written and read without TensorFlow.

The generators write examples from worker processes that should not load TF, and the
file checks read a sample of a user's file before TF is imported, so both speak the
wire format directly. Only what `tf.train.Example` uses: `Features` is a map from
name to `Feature`, a one-of of `BytesList` (1), `FloatList` (2) and `Int64List` (3);
lists may be packed or not, as the protobuf runtime writes either. The test suite
checks both directions against TF's own parser.
"""

from __future__ import annotations

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
