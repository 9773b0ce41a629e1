"""Calibration text: one sample per line, encoded by a ``tokenizers`` tokenizer (imported only
when needed) into the ids / attention mask / token type / position inputs, checked against the
model's embedding. A decoder's KV-cache inputs get empty caches: each line is a prompt."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from spa.calibration import (
    Arrays,
    CalibrationOptions,
    InputSpec,
    _dtype,
    _static,
    chosen,
    source_kind,
)
from spa.errors import OptionError
from spa.inputs import dim_key

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

_ROLES = (("ids", ("input_ids",)), ("mask", ("mask",)), ("types", ("token_type", "segment")),
          ("positions", ("position",)))
ID_RANGE = 1000  # synthetic ids are drawn from [0, ID_RANGE) when no embedding table is found
_CACHE_PARTS = ("past", "cache")  # a decoder's KV-cache inputs: past_key_values.0.key, …
# A HuggingFace folder's tokenizer files that transformers converts when no tokenizer.json is
# saved (BERT's WordPiece, GPT-2's byte-level BPE, SentencePiece), and the config beside them.
_CONVERTED = ("vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
_CONFIG = "tokenizer_config.json"
JSON_LINES = (".jsonl", ".ndjson")  # a JSON string or {"text": …, "text_pair": …} a line
Sample = str | tuple[str, str]  # a line's text, or a pair of segments
# Ops between a token-ids input and its embedding's Gather that keep the ids' values.
_KEEPS_VALUES = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def read_text(path: Path, inputs: Sequence[InputSpec], options: CalibrationOptions, *,
              graph: gs.Graph | None = None, dims: Mapping[str, int] | None = None,
              seed: int = 0) -> Arrays:
    """One sample per non-empty line of ``path``, tokenised and fed to the model's token ids,
    attention mask, token type and position inputs; a decoder's KV-cache inputs are empty (no
    past: the line is the prompt; their symbolic head counts and sizes from ``dims``). With
    ``graph``, ids the embedding lacks are refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); --calib "
                          "takes an .npz, a folder of images or a text file with one sample per "
                          "line") from None
    lines = _lines_of(path, text)
    if not lines:
        raise OptionError(f"{path}: no non-empty line to calibrate on")
    roles = token_roles(inputs)
    ids_spec = next(spec for spec in inputs if roles[spec.name] == "ids")
    tokenizer = _tokenizer(options.tokenizer)
    length = _sequence_length(ids_spec, options)
    if options.pack:
        ids = _packed(tokenizer, lines, length, path)
        ids = ids[chosen(len(ids), options, seed, "packed windows")]
        mask, types = np.ones_like(ids), np.zeros_like(ids)
    else:
        lines = [lines[i] for i in chosen(len(lines), options, seed, "lines")]
        encodings = _encode(tokenizer, lines, length)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings])
        types = np.array([e.type_ids for e in encodings])
    rows = None if graph is None else embedding_rows(graph, ids_spec.name)
    top = int(ids.max())
    if rows is not None and top >= rows:
        raise OptionError(f"the tokenizer gives ids up to {top} but the model's embedding has "
                          f"{rows} rows: wrong tokenizer? (--tokenizer {options.tokenizer})")
    return token_arrays(inputs, roles, ids, mask, types, dims or {})


def _lines_of(path: Path, text: str) -> list[Sample]:
    """The non-empty lines of ``text``, each a sample; in a JSON Lines file (``.jsonl``,
    ``.ndjson``: the form datasets are exported in), each line is a JSON string or an object
    whose ``"text"`` is the sample, with ``"text_pair"`` its second segment (token type 1)
    when given, as transformers names them."""
    if path.suffix.lower() not in JSON_LINES:
        return [line.strip() for line in text.splitlines() if line.strip()]
    out: list[Sample] = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OptionError(f"{path}: line {k} is not JSON ({exc.msg}, column {exc.colno})"
                              ) from None
        if isinstance(value, dict):
            first, second = value.get("text"), value.get("text_pair")
        else:
            first, second = value, None
        if not isinstance(first, str) or second is not None and not isinstance(second, str):
            found = f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
            raise OptionError(f"{path}: line {k}: a JSON Lines sample is a string, or an object "
                              f"with a \"text\" string (and a \"text_pair\" string for a "
                              f"second segment); found {found}")
        if first.strip():
            out.append(first if second is None else (first, second))
    return out


def random_tokens(inputs: Sequence[InputSpec], samples: int, dims: Mapping[str, int],
                  rng: np.random.Generator, *, graph: gs.Graph | None = None) -> Arrays | None:
    """Synthetic prompts for a decoder whose inputs are all token inputs and KV caches
    (:func:`token_roles`): ids uniform over the embedding's rows (:data:`ID_RANGE` when none is
    found), every token attended, type ids 0, positions counted, empty caches; as many tokens
    as the ids' dim (its size in ``dims``, spa/inputs.py, when symbolic). None for a model with
    other inputs or without caches.

    Encoders keep spa/torch/inversion.py's draws, a random integer in every token input, the
    mask too. Measured on all-MiniLM-L6-v2 (heads and MLP 0.3, cosine on held-out text), these
    prompts instead: 0.62 against 0.56 with one ratio per group, 0.55 against 0.69 by
    sensitivity; random ids say little either way (give text)."""
    try:
        roles = token_roles(inputs)
    except OptionError:
        return None
    if "cache" not in roles.values():
        return None
    ids_spec = next(spec for spec in inputs if roles[spec.name] == "ids")
    rows = None if graph is None else embedding_rows(graph, ids_spec.name)
    dim = list(ids_spec.shape or (None, None))[-1]
    key = dim_key(ids_spec.name, 1, dim)
    shape = (samples, dims.get(key, 1) if key is not None else int(dim))  # type: ignore[arg-type]
    ids = rng.integers(0, rows or ID_RANGE, size=shape)
    return token_arrays(inputs, roles, ids, np.ones(shape, np.int64), np.zeros(shape, np.int64),
                        dims)


def token_roles(inputs: Sequence[InputSpec]) -> dict[str, str]:
    """Each graph input's role by its name: ids, mask, types, positions, or a decoder's KV
    cache; an :class:`OptionError` for an input of none of these, or without exactly one ids
    input."""
    roles = {spec.name: "cache" if is_cache(spec) else _role(spec.name) for spec in inputs}
    ids = [name for name, role in roles.items() if role == "ids"]
    if len(ids) != 1:
        raise OptionError(f"a text file feeds one token-ids input (named like input_ids); the "
                          f"model has {ids}")
    return roles


def token_arrays(inputs: Sequence[InputSpec], roles: dict[str, str], ids: np.ndarray,
                 mask: np.ndarray, types: np.ndarray, dims: Mapping[str, int]) -> Arrays:
    """The inputs by role from ``[samples, tokens]`` ids, attention mask and type ids:
    positions as transformers counts them (attended tokens from 0, padding at 1), KV caches
    empty (each sample is a prompt)."""
    columns = {"ids": ids, "mask": mask, "types": types,
               "positions": np.where(mask != 0, np.cumsum(mask, 1) - 1, 1)}
    return {spec.name: _empty_cache(spec, len(ids), dims) if roles[spec.name] == "cache"
            else columns[roles[spec.name]].astype(_dtype(spec)) for spec in inputs}


def is_cache(spec: InputSpec) -> bool:
    """A decoder's KV-cache (past) input: floats of rank 3 or more, named like past or cache."""
    low = spec.name.lower()
    return any(part in low for part in _CACHE_PARTS) and _dtype(spec).kind == "f" \
        and len(spec.shape or ()) >= 3


def _empty_cache(spec: InputSpec, samples: int, dims: Mapping[str, int]) -> np.ndarray:
    """An empty past for each sample: its past-length dim (the symbolic one named like past,
    else the only symbolic one after the samples) is 0; the others (heads, head size) are
    fixed or sized in ``dims``."""
    shape = list(spec.shape or ())
    symbolic = [i for i in range(1, len(shape)) if not _static(shape[i])]
    named = [i for i in symbolic if "past" in str(shape[i]).lower()]
    past = named if len(named) == 1 else symbolic if len(symbolic) == 1 else []
    sizes = [samples]
    for i in range(1, len(shape)):
        key = dim_key(spec.name, i, shape[i])
        size = 0 if past and i == past[0] else dims.get(key) if key is not None else shape[i]
        if not past or not isinstance(size, int):
            raise OptionError(f"KV-cache input {spec.name!r} has shape {shape}: SPA fills an "
                              "empty cache when one dim after the first is its past length "
                              "(symbolic, named like past, or the only symbolic one) and the "
                              "others have sizes (give an .npz)")
        sizes.append(size)
    return np.zeros(sizes, _dtype(spec))


def _role(name: str) -> str:
    low = name.lower()
    if low in ("ids", "input"):
        return "ids"
    for role, parts in _ROLES:
        if any(part in low for part in parts):
            return role
    raise OptionError(f"a text file fills inputs named like input_ids, attention_mask, "
                      f"token_type_ids, position_ids and past_key_values; the model's input "
                      f"{name!r} is none of these (give an .npz)")


class _Tokenized(Protocol):
    """Options that name a tokenizer: :class:`CalibrationOptions` and ``PruneOptions``."""

    @property
    def tokenizer(self) -> str | None: ...


_Options = TypeVar("_Options", bound=_Tokenized)


def with_tokenizer(options: _Options, calib: str | None,
                   *models: str | os.PathLike[str] | None) -> _Options:
    """``options`` with ``--tokenizer`` defaulted (:func:`default_tokenizer`)."""
    found = default_tokenizer(calib, options.tokenizer, *models)
    return options if found == options.tokenizer else \
        dataclasses.replace(options, tokenizer=found)  # type: ignore[type-var]  # both are dataclasses


def default_tokenizer(calib: str | None, tokenizer: str | None,
                      *models: str | os.PathLike[str] | None) -> str | None:
    """``--tokenizer`` with its default: when ``calib`` is a text file and no tokenizer was
    given, the one saved beside the first of ``models`` (files or folders) that has one, as
    HuggingFace's ``save_pretrained``, Optimum's exports and onnxruntime-genai's folders leave
    it: a ``tokenizer.json``, or :data:`_CONVERTED` files with their ``tokenizer_config.json``."""
    if tokenizer is not None or calib is None or source_kind(Path(calib)) != "text":
        return tokenizer
    for model in models:
        if model is None:
            continue
        folder = Path(model) if Path(model).is_dir() else Path(model).parent
        if (folder / "tokenizer.json").is_file() or (folder / _CONFIG).is_file() and any(
                (folder / name).is_file() for name in _CONVERTED):
            log.info("--tokenizer: the one beside the model, in %s", folder)
            return str(folder)
    return None


def mask_token_id(path: str) -> int | None:
    """The id of the mask token ([MASK] or <mask>) of the tokenizer at ``path``, or None."""
    tokenizer = _tokenizer(path)
    return next((i for t in ("[MASK]", "<mask>")
                 if (i := tokenizer.token_to_id(t)) is not None), None)


def _tokenizer(path: str | None) -> Tokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("reading a text file needs tokenizers: "
                          "pip install 'spa-prune[text]'") from None
    if path is None:
        raise OptionError("a text file as --calib needs --tokenizer (a tokenizer.json, or a "
                          "folder holding one), and none is saved beside the model")
    if Path(path).is_dir() and not (Path(path) / "tokenizer.json").is_file():
        return _converted(Path(path))
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise OptionError(f"--tokenizer {path}: no such tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise OptionError(f"--tokenizer {file}: not a readable tokenizer.json "
                          f"({' '.join(str(exc).split())})") from None


def _converted(folder: Path) -> Tokenizer:
    """The tokenizer of a HuggingFace folder without a ``tokenizer.json`` (a BERT
    ``vocab.txt``, GPT-2's ``vocab.json`` and ``merges.txt``, a SentencePiece model), converted
    by transformers' ``AutoTokenizer`` offline, with its padding token and side."""
    found = [name for name in _CONVERTED if (folder / name).is_file()]
    if not found:
        raise OptionError(f"--tokenizer {folder}: the folder holds no tokenizer.json (nor "
                          f"{', '.join(_CONVERTED)} for transformers to convert)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise OptionError(f"--tokenizer {folder}: no tokenizer.json; converting its "
                          f"{', '.join(found)} needs transformers (pip install transformers), "
                          "or save one with transformers elsewhere: AutoTokenizer."
                          "from_pretrained(FOLDER).save_pretrained(FOLDER)") from None
    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here (ValueError, OSError, …)
        raise OptionError(f"--tokenizer {folder}: transformers could not read its "
                          f"{', '.join(found)} ({' '.join(str(exc).split())[:300]})") from None
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise OptionError(f"--tokenizer {folder}: transformers read it as "
                          f"{type(loaded).__name__}, which has no fast (tokenizers) form")
    if loaded.pad_token_id is not None and backend.padding is None:
        backend.enable_padding(pad_id=loaded.pad_token_id, pad_token=loaded.pad_token,
                               direction=loaded.padding_side)
    return backend


def _sequence_length(spec: InputSpec, options: CalibrationOptions) -> int:
    """The ids input's static sequence dim, else ``--max-length``."""
    shape = list(spec.shape) if spec.shape is not None else None
    if shape is not None and len(shape) != 2:
        raise OptionError(f"token-ids input {spec.name!r} has shape {shape}; a text file gives "
                          "[samples, tokens]")
    last = shape[1] if shape else None
    return int(last) if _static(last) else options.max_length  # type: ignore[arg-type]


def _encode(tokenizer: Tokenizer, lines: list[Sample], length: int) -> list[Any]:
    """``lines`` truncated and padded to ``length`` tokens, with the tokenizer's own padding
    (id, token, side) if it has one, else ``[PAD]``/``<pad>``'s id, else 0."""
    padding = tokenizer.padding or {"pad_id": _pad_id(tokenizer), "pad_type_id": 0,
                                    "direction": "right"}
    pad_token = padding.get("pad_token") or tokenizer.id_to_token(padding["pad_id"]) or "[PAD]"
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=padding["pad_id"], pad_token=pad_token,
                             pad_type_id=padding["pad_type_id"], direction=padding["direction"])
    return tokenizer.encode_batch(lines)


def _packed(tokenizer: Tokenizer, lines: list[Sample], length: int, path: Path) -> np.ndarray:
    """``--pack``: every line's tokens (with the special tokens the tokenizer adds to each),
    joined in order and cut into ``[samples, length]`` windows; the tail that does not fill
    one is dropped."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = np.fromiter((t for e in tokenizer.encode_batch(lines) for t in e.ids), np.int64)
    if len(ids) < length:
        raise OptionError(f"{path}: {len(ids)} tokens, fewer than one packed sample of "
                          f"{length} (--max-length)")
    return ids[:len(ids) - len(ids) % length].reshape(-1, length)


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
