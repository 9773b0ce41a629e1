"""A ModelProto serialised in pieces: the bytes of ``SerializeToString()``, without its cost.

Serialising a whole model makes protobuf grow one buffer to the model's size (copying it as it
doubles) and then copy it into a ``bytes``: several times the model in memory traffic, twice
in memory. The wire format is a concatenation of fields, in field-number order, so the same
bytes come out of small pieces:

    model  = header fields 1–6 · tag(graph) · len(G) · G · header fields 8+
    G      = graph fields 1–2 · (tag(initializer) · len(t) · t for each initializer)
             · graph fields 10+

where the header and the graph "without initializers" are small messages serialised whole, and
each initializer is serialised on its own. A message with fields this onnx does not know (which
protobuf writes after the known ones) is serialised whole instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_NAME = onnx.TensorProto.DESCRIPTOR.fields_by_name["name"].number
_RAW = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_LEN = 2  # wire type of length-delimited fields


def binary_protobuf(path: Path) -> bool:
    """Whether onnx reads and writes ``path`` as binary protobuf (by its extension; an unknown
    one is binary too), the only format these pieces and spans are about."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
    return fmt in (None, "protobuf")


def serialized_pieces(model: onnx.ModelProto,
                      initializer: Callable[[onnx.TensorProto], bytes] | None = None
                      ) -> list[bytes]:
    """Pieces whose concatenation is ``model.SerializeToString()``; ``initializer``: what to
    write for each of the graph's initializers instead of its own bytes (its serialised body;
    not called when the model is serialised whole, as one with unknown fields is)."""
    if not model.HasField("graph") or unknown_fields(model) or unknown_fields(model.graph):
        return [model.SerializeToString()]
    graph = model.graph
    inits = []
    for t in graph.initializer:
        body = t.SerializeToString() if initializer is None else initializer(t)
        inits += [_tag(_INITIALIZER) + _varint(len(body)), body]
    low, high = _split(_serialize_without(graph, "initializer"), _INITIALIZER)
    graph_len = len(low) + len(high) + sum(len(p) for p in inits)
    head_low, head_high = _split(_serialize_without(model, "graph"), _GRAPH)
    return [head_low, _tag(_GRAPH) + _varint(graph_len), low, *inits, high, head_high]


def raw_data_spans(data) -> dict[str, tuple[int, int]] | None:
    """Where each initializer's ``raw_data`` lies in ``data``, a serialised ModelProto: name →
    (offset, length). None unless each is plain: one graph, one name and at most one
    ``raw_data`` per tensor, distinct names (protobuf would merge repeated fields)."""
    graphs = [(start, end) for number, start, end in _fields(data, 0, len(data))
              if number == _GRAPH]
    if len(graphs) != 1:
        return None
    spans: dict[str, tuple[int, int]] = {}
    names: set[str] = set()
    for number, start, end in _fields(data, *graphs[0]):
        if number != _INITIALIZER:
            continue
        fields = [(n, s, e) for n, s, e in _fields(data, start, end) if n in (_NAME, _RAW)]
        name = [bytes(data[s:e]).decode() for n, s, e in fields if n == _NAME]
        raw = [(s, e - s) for n, s, e in fields if n == _RAW]
        if len(name) != 1 or len(raw) > 1 or name[0] in names:
            return None
        names.add(name[0])
        if raw:
            spans[name[0]] = raw[0]
    return spans


def _fields(data, start: int, end: int):
    """(number, value start, value end) of each field of the message in ``data[start:end]``
    (the value of a varint or fixed-size field is not decoded)."""
    pos = start
    while pos < end:
        key, pos = _read_varint(data, pos)
        value_start = _read_varint(data, pos)[1] if key & 7 == _LEN else pos  # after its length
        pos = _skip(data, pos, key & 7)
        yield key >> 3, value_start, pos
    if pos != end:
        raise ValueError("truncated protobuf message")


def copy_without(message, field: str):
    """A new message with every field of ``message`` but ``field``, copied field by field
    (``CopyFrom`` then ``ClearField`` would copy that field first)."""
    out = type(message)()
    for fd, value in message.ListFields():
        if fd.name == field:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def unknown_fields(message) -> bool:
    """Whether ``message`` itself holds fields its schema does not know."""
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # older protobuf: assume it does
        return True
    return len(UnknownFieldSet(message)) > 0


def _serialize_without(message, field: str) -> bytes:
    return copy_without(message, field).SerializeToString()


def _split(data: bytes, number: int) -> tuple[bytes, bytes]:
    """``data`` (a serialised message) cut before its first field numbered above ``number``."""
    pos = 0
    while pos < len(data):
        key, end = _read_varint(data, pos)
        if key >> 3 > number:
            break
        pos = _skip(data, end, key & 7)
    return data[:pos], data[pos:]


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == _LEN:
        length, pos = _read_varint(data, pos)
        return pos + length
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unexpected protobuf wire type {wire_type}")  # groups: not in ONNX


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _tag(number: int) -> bytes:
    return _varint(number << 3 | _LEN)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
