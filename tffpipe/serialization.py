"""Values in TFF's wire format (`executor_pb2.Value`), built in place and shared between workers.

TFF 0.87's `value_serialization.serialize_value` builds the proto bottom-up, and under the
upb protobuf backend every message constructor copies the subtree it is given, so the
cost grows with nesting times bytes: 18.6 ms for the CNN FedAvg state (4.83 MB), 77.5 ms
for the FedAdam state (14.5 MB), paid once per worker per value (issue 22).
`serialize_value` fills one proto in place instead (`out.struct.element.add()`,
`array.content = arr.tobytes()`) and gives the same bytes (tests/serialization_test.py
checks every state tffpipe builds); what it does not handle itself (scalars, strings,
sequences, computations, anything not an exactly typed array) goes to TFF's serializer.

`SharedValues` serializes a value once for all the workers of one invocation: the
mergeable context hands every worker the same server-state leaves, and the bytes do not
depend on the worker.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import tensorflow as tf
from tensorflow_federated.proto.v0 import array_pb2, computation_pb2, executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import array
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    array_shape,
    computation_types,
    dtype_utils,
    placements,
    type_serialization,
)

_COMPUTATIONS = (computation_pb2.Computation, computation_impl.ConcreteComputation)


def serialize_value(value: object, type_spec: computation_types.Type | None) -> tuple[executor_pb2.Value, object]:
    """`value_serialization.serialize_value(value, type_spec)`, the same bytes, built in place.

    Returns:
      (the proto, the value's type), as TFF's.
    """
    out = executor_pb2.Value()
    return out, _serialize_into(out, value, type_spec)


def _serialize_into(out: executor_pb2.Value, value: object, type_spec) -> computation_types.Type:
    if isinstance(value, _COMPUTATIONS) or type_spec is None:
        return _with_tff(out, value, type_spec)
    if isinstance(type_spec, computation_types.StructType):
        elements = structure.to_elements(structure.from_container(value))
        if len(elements) != len(type_spec):
            return _with_tff(out, value, type_spec)  # TFF raises its error
        out.struct.SetInParent()  # an empty struct is present, as TFF writes it
        # As TFF: the names come from the type, whatever the value's container says.
        for (name, element_type), (_, element) in zip(structure.iter_elements(type_spec), elements, strict=True):
            slot = out.struct.element.add()
            if name:
                slot.name = name
            _serialize_into(slot.value, element, element_type)
        return type_spec
    if isinstance(type_spec, computation_types.FederatedType):
        members = [value] if type_spec.all_equal else value
        if not isinstance(members, list):
            return _with_tff(out, value, type_spec)  # TFF raises its error
        for member in members:
            member_type = _serialize_into(out.federated.value.add(), member, type_spec.member)
            type_spec.member.check_assignable_from(member_type)
        out.federated.type.CopyFrom(type_serialization.serialize_type(type_spec).federated)
        return type_spec
    if isinstance(type_spec, computation_types.SequenceType) and _is_list_of_strings(value, type_spec):
        # A client group's member ids (`client_groups`). TFF's `make_data_set_from_elements`
        # converts each element to a tensor on its own (W3: ~180 ms of CPU a round for 1,000
        # ids under a profiler); one slice dataset of the whole list holds the same elements,
        # and TFF serializes a dataset as it is.
        return _with_tff(out, tf.data.Dataset.from_tensor_slices(tf.constant(value, tf.string)), type_spec)
    if isinstance(type_spec, computation_types.TensorType) and _is_plain_array(value, type_spec):
        # TFF's `array.to_proto_content` for a non-scalar array of the type's own dtype.
        proto = out.array
        proto.dtype = dtype_utils.to_proto(type_spec.dtype.type)
        proto.shape.SetInParent()
        proto.shape.dim.extend(value.shape)
        proto.content = value.tobytes()
        return type_spec
    return _with_tff(out, value, type_spec)


def _is_list_of_strings(value: object, type_spec: computation_types.SequenceType) -> bool:
    element = type_spec.element
    return (
        isinstance(element, computation_types.TensorType)
        and element.dtype.type is np.str_
        and array_shape.is_shape_scalar(element.shape)
        and isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) for v in value)
    )


def _is_plain_array(value: object, type_spec: computation_types.TensorType) -> bool:
    return (
        isinstance(value, np.ndarray)
        and value.dtype.type is type_spec.dtype.type
        and type_spec.dtype.type is not np.str_
        and not array_shape.is_shape_scalar(type_spec.shape)
        and array.is_compatible_shape(value, type_spec.shape)
    )


def _with_tff(out: executor_pb2.Value, value: object, type_spec) -> computation_types.Type:
    proto, value_type = value_serialization.serialize_value(value, type_spec)
    out.MergeFrom(proto)
    return value_type


# Field numbers of the messages `deserialize_value` reads itself (from the descriptors).
def _number(message, field: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].number


_VALUE_STRUCT, _VALUE_ARRAY, _VALUE_FEDERATED = (
    _number(executor_pb2.Value, f) for f in ("struct", "array", "federated")
)
_STRUCT_ELEMENT = _number(executor_pb2.Value.Struct, "element")
_ELEMENT_NAME, _ELEMENT_VALUE = (_number(executor_pb2.Value.Struct.Element, f) for f in ("name", "value"))
_FEDERATED_TYPE, _FEDERATED_VALUE = (_number(executor_pb2.Value.Federated, f) for f in ("type", "value"))
_ARRAY_CONTENT = _number(array_pb2.Array, "content")
_RESPONSE_VALUE = _number(executor_pb2.ComputeResponse, "value")
_LENGTH_DELIMITED = 2


class _TffReads(Exception):  # noqa: N818  (not an error: the value goes to TFF's deserializer)
    pass


def deserialize_compute_response(data: bytes, type_hint) -> object:
    """The value in a serialized `executor_pb2.ComputeResponse`: `deserialize_value(...)[0]`, its type not made.

    A remote executor's `compute` returns the value only; the types TFF's deserializer
    builds along the way (a `StructType` per struct, each checking its elements) are
    skipped where `type_hint` gives them.
    """
    try:
        values = [field for number, _, field, _, _ in _fields(memoryview(data)) if number == _RESPONSE_VALUE]
        if len(values) != 1 or not isinstance(values[0], memoryview):
            raise _TffReads  # none, or several (protobuf merges them)
        return _read_value(values[0], type_hint, typed=type_hint is None)[0]
    except _TffReads:
        response = executor_pb2.ComputeResponse.FromString(data)  # protobuf's reading, or its error
        return value_serialization.deserialize_value(response.value, type_hint)[0]


def deserialize_value(data: bytes | memoryview, type_hint=None) -> tuple[object, computation_types.Type]:
    """`value_serialization.deserialize_value(executor_pb2.Value.FromString(data), type_hint)`, read in place.

    What a worker returns (W1's partial aggregate: 4.8 MB, one per worker per round) went
    through three copies here: the proto parsed from the received bytes, each array's
    `content` copied out of the proto, and TFF's tree of spans and type checks around it.
    This reads the wire format itself, and each array of 64 KiB or more is a read-only view
    of `data` (`np.frombuffer`, as TFF's `array.from_proto_content` is of its copy; a
    smaller one is copied, so that it does not hold all of `data`). Structs and federated
    values are read here, arrays' contents too; anything else (a scalar, strings, a
    sequence, a computation, a malformed value) goes to TFF's deserializer, which gives
    its value or its error (tests/serialization_test.py checks that both give equal values
    and types).
    """
    view = memoryview(data)
    try:
        return _read_value(view, type_hint, typed=True)
    except _TffReads:
        return _tff_reads(view, type_hint)


def _tff_reads(view: memoryview, type_hint) -> tuple[object, computation_types.Type]:
    return value_serialization.deserialize_value(executor_pb2.Value.FromString(bytes(view)), type_hint)


def _read_value(view: memoryview, type_hint, typed: bool) -> tuple[object, computation_types.Type | None]:
    """(value, its type, or None unless `typed`), or _TffReads for TFF's deserializer."""
    fields = list(_fields(view))
    if len(fields) != 1 or fields[0][1] != _LENGTH_DELIMITED:
        raise _TffReads
    number, _, body, _, _ = fields[0]
    if number == _VALUE_STRUCT:
        return _read_struct(body, type_hint, typed)
    if number == _VALUE_ARRAY:
        return _read_array(body, type_hint, typed)
    if number == _VALUE_FEDERATED:
        return _read_federated(body, type_hint, typed)
    raise _TffReads


def _read_element(view: memoryview, type_hint, typed: bool) -> tuple[object, computation_types.Type | None]:
    try:
        return _read_value(view, type_hint, typed)
    except _TffReads:
        return _tff_reads(view, type_hint)


def _read_struct(body: memoryview, type_hint, typed: bool) -> tuple[object, computation_types.Type | None]:
    # As TFF's `_deserialize_struct_value`.
    if type_hint is not None and not isinstance(type_hint, computation_types.StructType):
        raise _TffReads
    elements = []
    for number, wire, element, _, _ in _fields(body):
        if number != _STRUCT_ELEMENT or wire != _LENGTH_DELIMITED:
            raise _TffReads
        names, values = _two_fields(element, _ELEMENT_NAME, _ELEMENT_VALUE)
        if len(values) != 1:
            raise _TffReads  # none (TFF's error), or several (protobuf merges them)
        try:
            name = str(names[-1], "utf-8") if names else ""
        except UnicodeDecodeError:
            raise _TffReads from None  # protobuf's error
        elements.append((name or None, values[0]))
    element_types = tuple(type_hint) if type_hint is not None else [None] * len(elements)
    values, types = [], []
    for (name, element), element_type in zip(elements, element_types, strict=False):  # as TFF's
        value, value_type = _read_element(element, element_type, typed)
        values.append((name, value))
        types.append((name, value_type) if name else value_type)
    return structure.Struct(values), computation_types.StructType(types) if typed else None


_COPIED_BELOW = 1 << 16  # bytes: a smaller array is copied out of the message, not viewed


def _read_array(body: memoryview, type_hint, typed: bool) -> tuple[object, computation_types.Type | None]:
    # As TFF's `_deserialize_tensor_value` and `array.from_proto_content` for a non-scalar array
    # with `content`, the rest of the message (dtype, shape: a few bytes) parsed by protobuf; TFF's
    # own `_deserialize_tensor_value` for a scalar or strings (repeated fields).
    if type_hint is not None and not isinstance(type_hint, computation_types.TensorType):
        raise _TffReads
    content, rest = [], []
    for number, wire, field, start, end in _fields(body):
        if number == _ARRAY_CONTENT and wire == _LENGTH_DELIMITED:
            content.append(field)
        else:
            rest.append(body[start:end])
    header = array_pb2.Array.FromString(b"".join(rest))
    dtype = dtype_utils.from_proto(header.dtype)
    shape = array_shape.from_proto(header.shape)
    hint_shape, hint_dtype = (type_hint.shape, type_hint.dtype.type) if type_hint is not None else (shape, dtype)
    if len(content) != 1 or header.WhichOneof("kind") is not None or array_shape.is_shape_scalar(hint_shape):
        raise _TffReads
    if hint_dtype is np.str_ or dtype is np.str_:
        raise _TffReads
    value = np.frombuffer(content[0], dtype)
    if value.nbytes < _COPIED_BELOW:
        value = value.copy()
        value.flags.writeable = False  # as the view would be
    value = value.reshape(shape) if not array_shape.is_shape_scalar(shape) else dtype(value.item())
    if not typed:
        return value, None
    return value, type_hint if type_hint is not None else computation_types.TensorType(dtype, shape)


def _read_federated(body: memoryview, type_hint, typed: bool) -> tuple[object, computation_types.Type | None]:
    # As TFF's `_deserialize_federated_value`; the type (a few bytes) parsed by protobuf.
    if type_hint is not None and not isinstance(type_hint, computation_types.FederatedType):
        raise _TffReads
    type_bytes, members = _two_fields(body, _FEDERATED_TYPE, _FEDERATED_VALUE)
    if not members:
        raise _TffReads  # TFF raises its error
    federated_type = computation_pb2.FederatedType()
    for part in type_bytes:
        federated_type.MergeFromString(part)  # as protobuf merges a repeated message field
    all_equal = type_hint.all_equal if type_hint is not None else federated_type.all_equal
    member_hint = type_hint.member if type_hint is not None else None
    member_type, values = None, []
    for member in members[:1] if all_equal else members:
        value, value_type = _read_element(member, member_hint, typed)
        if typed:
            member_type = value_serialization._ensure_deserialized_types_compatible(member_type, value_type)  # noqa: SLF001
        values.append(value)
    placement = placements.uri_to_placement_literal(federated_type.placement.value.uri)  # TFF's error for a bad one
    value = values[0] if all_equal else values
    if not typed:
        return value, None
    return value, computation_types.FederatedType(member_type, placement=placement, all_equal=all_equal)


def _two_fields(view: memoryview, first: int, second: int) -> tuple[list, list]:
    """The values of fields `first` and `second` (length-delimited) of a message that has no others."""
    found: tuple[list, list] = ([], [])
    for number, wire, field, _, _ in _fields(view):
        if wire != _LENGTH_DELIMITED or number not in (first, second):
            raise _TffReads
        found[number == second].append(field)
    return found


def _fields(view: memoryview):
    """(number, wire type, value, start, end) of each field of a message: varints as ints, others as views."""
    i, n = 0, len(view)
    while i < n:
        start = i
        key, i = _read_varint(view, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(view, i)
        elif wire == _LENGTH_DELIMITED:
            length, i = _read_varint(view, i)
            value, i = view[i : i + length], i + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = view[i : i + size], i + size
        else:
            raise _TffReads  # groups: not in TFF's messages
        if i > n:
            raise _TffReads  # truncated: protobuf raises its error
        yield number, wire, value, start, i


def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(view) or shift > 63:
            raise _TffReads
        byte = view[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def is_computation(value: object) -> bool:
    return isinstance(value, _COMPUTATIONS)


def leaves(value: object, type_spec: computation_types.Type) -> list:
    """The objects `value` is made of, in the order of `type_spec`'s leaves (as TFF binds them)."""
    found: list = []
    _leaves(value, type_spec, found)
    return found


def _leaves(value: object, type_spec, found: list) -> None:
    """The objects `value` is made of, walked along its type as `serialize_value` walks it."""
    if isinstance(value, _COMPUTATIONS) or type_spec is None:
        found.append(value)
    elif isinstance(type_spec, computation_types.StructType):
        elements = _elements(value)
        if elements is None or len(elements) != len(type_spec):
            found.append(value)  # serializing it raises TFF's error
            return
        for element, element_type in zip(elements, type_spec, strict=True):
            _leaves(element, element_type, found)
    elif isinstance(type_spec, computation_types.FederatedType) and (type_spec.all_equal or isinstance(value, list)):
        for member in [value] if type_spec.all_equal else value:
            _leaves(member, type_spec.member, found)
    else:
        found.append(value)


def _elements(value: object) -> list | None:
    """The values of `structure.to_elements(structure.from_container(value))`, None for a non-container.

    Without making the `Struct` for the containers TFF's conversions give (a struct, a
    list, a tuple, a dict of names in its order): `from_container` asks every value whether it is a
    named tuple (a `typing.Protocol` check: ~20 us), and the struct checks every element
    (W1: a walk of each partial aggregate at every merge).
    """
    kind = type(value)
    if kind is structure.Struct:
        return [v for _, v in structure.iter_elements(value)]
    if kind in (list, tuple):  # exactly: a named tuple goes to TFF
        return list(value)
    if kind in (dict, collections.OrderedDict) and all(type(k) is str for k in value):
        return list(value.values())
    try:
        return [v for _, v in structure.to_elements(structure.from_container(value))]
    except TypeError:
        return None


class _Entry:
    def __init__(self, type_spec, leaves: list):
        # Holding the leaves and the type keeps their ids from being reused while cached.
        self.type_spec = type_spec
        self.leaves = leaves
        self.lock = threading.Lock()
        self.serialized: bytes | None = None
        self.value_type = None


class SerializedComputations:
    """The serialized `executor_pb2.Value` of each computation, made once per (computation, type) object.

    A context sends the same compiled computation to every worker, every round (TFF
    rebuilds its proto, and deserializes its type, each time). Owned by the context whose
    workers share it (a run's context lives as long as its workers), keyed on the objects'
    identities, which the entry holds, for the `kept` most recently used. A second thread
    asking for a computation being serialized waits for the first one's bytes (at round 1,
    W workers ask at once), as `runtime._CompileOnce` does for compiling.
    """

    def __init__(
        self, kept: int = 16
    ):  # a run sends a handful (initialize, next, evaluation forms); each may hold a model
        self._kept = kept
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[int, int], _Entry] = collections.OrderedDict()

    def serialize(self, comp: object, type_spec) -> tuple[bytes, object]:
        """(the serialized `executor_pb2.Value` of computation `comp`, its type)."""
        key = (id(comp), id(type_spec))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(type_spec, [comp])
                while len(self._entries) > self._kept:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        with entry.lock:
            if entry.serialized is None:
                proto, entry.value_type = serialize_value(comp, type_spec)
                entry.serialized = proto.SerializeToString()
        return entry.serialized, entry.value_type


class SharedValues:
    """Serialized values keyed on the identities of the value's leaves (and an equal type), shared across threads.

    Valid within one invocation, while nobody mutates the leaves (TFF does not): the
    owner calls `clear` after each. Two threads asking for the same value serialize it
    once; the second waits for the first's bytes. Only values of an all-equal federated
    type are kept: those are what the mergeable context gives every worker alike (the
    server state, to each worker's `up_to_merge` and to `after_merge`); clients' slices
    and partial aggregates differ per call, and keeping them would only hold their bytes
    until the invocation ends. The same value object under the same type object (what
    the context hands each worker) is found without walking its leaves. Computations go
    to `computations`, kept across invocations.
    """

    def __init__(self, computations: SerializedComputations | None = None):
        self.computations = computations if computations is not None else SerializedComputations()
        self._lock = threading.Lock()
        self._entries: dict[tuple, _Entry] = {}
        self._by_object: dict[tuple[int, int], tuple[object, _Entry]] = {}
        self.hits = 0

    def serialize(self, value: object, type_spec) -> tuple[bytes, object]:
        """(the serialized `executor_pb2.Value` of `value`, its type), made once per invocation."""
        if not (isinstance(type_spec, computation_types.FederatedType) and type_spec.all_equal):
            return serialize_to_bytes(value, type_spec, self.computations)
        with self._lock:
            found = self._by_object.get((id(value), id(type_spec)))
        if found is not None and found[0] is value and found[1].type_spec is type_spec:
            entry = found[1]
            with self._lock:
                self.hits += 1
        else:
            leaves: list = []
            _leaves(value, type_spec, leaves)
            key = tuple(map(id, leaves))
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = _Entry(type_spec, leaves)
                elif entry.type_spec != type_spec:
                    entry = _Entry(type_spec, leaves)  # the same objects under another type: not shared
                else:
                    self.hits += 1
                if entry.type_spec is type_spec:
                    self._by_object[id(value), id(type_spec)] = (value, entry)  # holds the value: its id stays its own
        with entry.lock:
            if entry.serialized is None:
                proto, entry.value_type = serialize_value(value, type_spec)
                entry.serialized = proto.SerializeToString()
        return entry.serialized, entry.value_type

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_object.clear()


def serialize_to_bytes(
    value: object, type_spec, computations: SerializedComputations | None = None
) -> tuple[bytes, object]:
    """(the serialized `executor_pb2.Value` of `value`, its type); computations once each with `computations`."""
    if computations is not None and isinstance(value, _COMPUTATIONS):
        return computations.serialize(value, type_spec)
    proto, value_type = serialize_value(value, type_spec)
    return proto.SerializeToString(), value_type


def create_value_request(serialized_value: bytes, executor: executor_pb2.ExecutorId) -> bytes:
    """`executor_pb2.CreateValueRequest(executor=executor, value=...).SerializeToString()` from the value's bytes.

    Field 1 (`value`, length-delimited) and then field 2 (`executor`), in field order as
    protobuf writes them, so that the bytes equal the proto's without parsing the value.
    """
    head = executor_pb2.CreateValueRequest.DESCRIPTOR.fields_by_name["value"].number << 3 | 2
    return b"".join(
        (
            _varint(head),
            _varint(len(serialized_value)),
            serialized_value,
            executor_pb2.CreateValueRequest(executor=executor).SerializeToString(),
        )
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
