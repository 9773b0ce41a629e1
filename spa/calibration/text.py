"""Calibration text: one sample per line, encoded by a ``tokenizers`` tokenizer (imported only
when needed) into the ids / attention mask / token type inputs, checked against the model's
embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from spa.calibration import Arrays, CalibrationOptions, InputSpec, _dtype, _static
from spa.errors import OptionError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_ROLES = (("ids", ("input_ids",)), ("mask", ("mask",)), ("types", ("token_type", "segment")))
# Ops between a token-ids input and its embedding's Gather that keep the ids' values.
_KEEPS_VALUES = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def read_text(path: Path, inputs: Sequence[InputSpec], options: CalibrationOptions, *,
              graph: gs.Graph | None = None) -> Arrays:
    """One sample per non-empty line of ``path``, tokenised and fed to the model's token ids,
    attention mask and token type inputs; with ``graph``, ids the embedding lacks are refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); --calib "
                          "takes an .npz, a folder of images or a text file with one sample per "
                          "line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise OptionError(f"{path}: no non-empty line to calibrate on")
    roles = {spec.name: _role(spec.name) for spec in inputs}
    ids_specs = [spec for spec in inputs if roles[spec.name] == "ids"]
    if len(ids_specs) != 1:
        raise OptionError(f"a text file feeds one token-ids input (named like input_ids); the "
                          f"model has {[s.name for s in ids_specs]}")
    tokenizer = _tokenizer(options.tokenizer)
    encodings = _encode(tokenizer, lines, _sequence_length(ids_specs[0], options))
    columns = {"ids": np.array([e.ids for e in encodings], np.int64),
               "mask": np.array([e.attention_mask for e in encodings], np.int64),
               "types": np.array([e.type_ids for e in encodings], np.int64)}
    rows = None if graph is None else embedding_rows(graph, ids_specs[0].name)
    top = int(columns["ids"].max())
    if rows is not None and top >= rows:
        raise OptionError(f"the tokenizer gives ids up to {top} but the model's embedding has "
                          f"{rows} rows: wrong tokenizer? (--tokenizer {options.tokenizer})")
    return {spec.name: columns[roles[spec.name]].astype(_dtype(spec)) for spec in inputs}


def _role(name: str) -> str:
    low = name.lower()
    if low in ("ids", "input"):
        return "ids"
    for role, parts in _ROLES:
        if any(part in low for part in parts):
            return role
    raise OptionError(f"a text file fills inputs named like input_ids, attention_mask and "
                      f"token_type_ids; the model's input {name!r} is none of these (give an .npz)")


def _tokenizer(path: str | None) -> Tokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("reading a text file needs tokenizers: "
                          "pip install 'spa-prune[text]'") from None
    if path is None:
        raise OptionError("a text file as --calib needs --tokenizer (a tokenizer.json, or a "
                          "folder holding one)")
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise OptionError(f"--tokenizer {path}: no such tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise OptionError(f"--tokenizer {file}: not a readable tokenizer.json "
                          f"({' '.join(str(exc).split())})") from None


def _sequence_length(spec: InputSpec, options: CalibrationOptions) -> int:
    """The ids input's static sequence dim, else ``--max-length``."""
    shape = list(spec.shape) if spec.shape is not None else None
    if shape is not None and len(shape) != 2:
        raise OptionError(f"token-ids input {spec.name!r} has shape {shape}; a text file gives "
                          "[samples, tokens]")
    last = shape[1] if shape else None
    return int(last) if _static(last) else options.max_length  # type: ignore[arg-type]


def _encode(tokenizer: Tokenizer, lines: list[str], length: int) -> list[Any]:
    """``lines`` truncated and padded to ``length`` tokens, with the tokenizer's own padding
    (id, token, side) if it has one, else ``[PAD]``/``<pad>``'s id, else 0."""
    padding = tokenizer.padding or {"pad_id": _pad_id(tokenizer), "pad_type_id": 0,
                                    "direction": "right"}
    pad_token = padding.get("pad_token") or tokenizer.id_to_token(padding["pad_id"]) or "[PAD]"
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=padding["pad_id"], pad_token=pad_token,
                             pad_type_id=padding["pad_type_id"], direction=padding["direction"])
    return tokenizer.encode_batch(lines)


def _pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    return 0


def embedding_rows(graph: gs.Graph, input_name: str) -> int | None:
    """Rows of the embedding table that the token ids ``input_name`` index: the ids followed
    through value-keeping ops to a ``Gather`` (axis 0) of a constant. The fewest rows if
    several tables are reached; None if none is."""
    tensor = graph.tensors().get(input_name)
    todo = [tensor] if tensor is not None else []
    rows: list[int] = []
    while todo:
        ids = todo.pop()
        for node in ids.outputs:
            if node.op in _KEEPS_VALUES and node.inputs and node.inputs[0] is ids:
                todo.extend(node.outputs[:1])
            elif node.op == "Gather" and len(node.inputs) == 2 and node.inputs[1] is ids:
                table = _constant_shape(node.inputs[0])
                if table and node.attrs.get("axis", 0) % len(table) == 0:
                    rows.append(int(table[0]))
    return min(rows, default=None)


def _constant_shape(tensor: gs.Tensor) -> Sequence[int] | None:
    """The shape of ``tensor`` if it is a constant (an initializer or a ``Constant`` node)."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    producer = tensor.inputs[0] if tensor.inputs else None
    value = producer.attrs.get("value") if producer is not None and producer.op == "Constant" \
        else None
    return tuple(value.shape) if isinstance(value, gs.Constant) else None
