"""Validation with onnxruntime, and the numeric oracle of DESIGN.md.

* :func:`check_signature`: the pruned model's outputs have the original's names, dtypes, shapes.
* :func:`masked_model`: the original model with, for every removed channel, its input-weight
  slice zeroed at every consumer, and for every dropped residual block the weights and biases
  of its branch's last layer zeroed (the branch then adds exactly 0) — built from the plan and
  the group members alone, never with the rewrite code, so the oracle stays independent of
  what it checks.
* :func:`check_close`: pruned outputs equal the masked original's to a tolerance relative to the
  output scale; :func:`check_exact`: integer and bool outputs equal the reference's exactly.
* :func:`oracle_exemption`: why the numeric oracle cannot hold for a plan (compensated weights,
  normalisation statistics over a pruned axis), or None when it must hold: then it runs by
  default.
* :func:`weight_free_outputs`: integer and bool outputs that no float weight reaches (shapes,
  sizes): they must equal the *original's* exactly even where the oracle does not apply.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import helper, numpy_helper

from spa.errors import ValidationError, one_line
from spa.inputs import dim_key
from spa.ir.quant import through_chains, zero_point_fill
from spa.ir.wire import serialized_pieces
from spa.plan import removed_indices

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from spa.coupling.analysis import Analysis
    from spa.plan import Plan

ModelSource = "str | bytes | onnx.ModelProto"
ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
}


def session(model, *, threads: int | None = None, spin: bool = True, optimize: bool = True,
            what: str = "model", arena: bool = True, provider: str = "CPUExecutionProvider",
            fuse_qdq: bool = True) -> ort.InferenceSession:
    """An onnxruntime session (CPU unless ``provider`` says) for a path, serialized bytes or a
    ModelProto.

    ``spin=False`` stops idle worker threads from spinning after a run, so that several
    sessions timed in turn do not steal each other's cores; ``optimize=False`` skips graph
    optimisation (half the set-up time) for a session that only checks that a model runs.
    ``what`` names the model in errors (the original model failing says the pruned one could
    not be checked, not that it is bad). ``fuse_qdq=False`` runs QuantizeLinear/DequantizeLinear
    pairs as they stand, around float kernels, instead of fusing them into integer ones.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the user in the exception, not on stderr in colour
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not arena:  # many short-lived sessions: an arena each would keep its peak
        opts.enable_cpu_mem_arena = False
    if not fuse_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    apart = _Apart()  # alive until the session is made: onnxruntime copies the weights then
    if isinstance(model, onnx.ModelProto):
        try:
            model = _serialized(model, apart)
        except (EncodeError, ValueError) as exc:  # over 2 GB
            raise ValidationError("the model is too large to pass to onnxruntime in memory "
                                  f"({one_line(exc)})") from exc
        if apart.names:
            opts.add_external_initializers(apart.names, apart.values)
    elif not isinstance(model, bytes):
        model = str(model)
    try:
        return ort.InferenceSession(model, opts, providers=list(dict.fromkeys(
            (provider, "CPUExecutionProvider"))))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ValidationError(f"onnxruntime cannot load the {what}: {one_line(exc)}") from exc


def _serialized(model: onnx.ModelProto, apart: _Apart) -> bytes:
    """``model.SerializeToString()``, made from pieces (spa/ir/wire.py: far less copying),
    with the large weights left out and collected in ``apart`` instead."""
    pieces = serialized_pieces(model, apart.body)
    if sum(len(p) for p in pieces) > onnx.checker.MAXIMUM_PROTOBUF:
        return model.SerializeToString()  # fails as protobuf does
    return b"".join(pieces)


class _Apart:
    """The large plain initializers of a model handed to onnxruntime beside its bytes
    (``SessionOptions.add_external_initializers``) instead of inside them: the bytes hold a
    reference to external data in their place, which onnxruntime fills from these values
    before any optimisation, so the session is the same. Serialising the weights into the
    bytes and parsing them back out cost more than the rest of making the session (ResNet-50:
    0.37 s → 0.2 s a session; sensitivity makes one per group's start, reconstruction one per
    segment of each model)."""

    SIZE = 1 << 10  # smaller initializers (shapes, axes, scales) stay inside the bytes
    TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                       onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
                       onnx.TensorProto.INT64})

    def __init__(self) -> None:
        self.names: list[str] = []
        self.values: list[ort.OrtValue] = []  # (each holds its array: a view of the proto's)

    def body(self, tensor: onnx.TensorProto) -> bytes:
        """What the bytes hold for ``tensor``: itself, or a reference to its value apart."""
        plain = tensor.data_type in self.TYPES and not tensor.external_data \
            and tensor.data_location == onnx.TensorProto.DEFAULT
        raw = tensor.raw_data if plain else b""
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type) if plain else None
        if dtype is None or len(raw) < self.SIZE or len(raw) != dtype.itemsize * int(
                np.prod(tensor.dims, dtype=np.int64)):
            return tensor.SerializeToString()
        array = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        self.names.append(tensor.name)
        self.values.append(ort.OrtValue.ortvalue_from_numpy(array))
        ref = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                               data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "spa-weights-apart"), ("offset", "0"),
                           ("length", str(len(raw)))):
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
        return ref.SerializeToString()


def random_inputs(sess: ort.InferenceSession, *, seed: int = 0, dims: dict[str, int] | None = None,
                  ) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input. A symbolic dim takes its size from ``dims``
    (keyed as :func:`spa.inputs.dim_key` says; SPA resolves them once, spa/inputs.py), or 1."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        shape = [d if (key := dim_key(inp.name, a, d)) is None else dims.get(key, 1)
                 for a, d in enumerate(inp.shape)]
        dtype = ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ValidationError(f"input '{inp.name}' has type {inp.type}, which SPA cannot feed")
        value: np.ndarray
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape)
        elif dtype is np.bool_:
            value = rng.random(shape) < 0.5
        else:
            value = rng.integers(0, 2, size=shape)
        feeds[inp.name] = np.asarray(value, dtype=dtype)  # 0-d inputs stay arrays
    return feeds


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds)))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ValidationError(f"onnxruntime failed to run the model: {one_line(exc)}") from exc


def run_into(sess: ort.InferenceSession, feeds: dict[str, np.ndarray],
             outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`run`, its outputs written into the arrays ``outputs`` (C-contiguous, of the
    outputs' shapes and types: else a ValidationError) instead of onnxruntime's memory."""
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, array in outputs.items():
        binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    try:
        sess.run_with_iobinding(binding)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ValidationError(f"onnxruntime failed to run the model: {one_line(exc)}") from exc
    return dict(outputs)


def batch_of(sess: ort.InferenceSession, default: int = 32) -> int:
    """How many samples to feed at once: the first input's fixed first dim, else ``default``."""
    first = sess.get_inputs()[0].shape[0] if sess.get_inputs() else None
    return first if isinstance(first, int) and first > 0 else default


def run_chunked(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], chunk: int | None = None,
                *, whole: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """:func:`run` over the samples of ``inputs`` (first axis) in chunks the model takes
    (:func:`batch_of`), outputs concatenated along the first axis; ``whole``: feeds given
    unsliced with every chunk (overridden initializers)."""
    step = chunk or batch_of(sess)
    inputs = {i.name: inputs[i.name] for i in sess.get_inputs()  # not labels, say
              if whole is None or i.name not in whole}
    n = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, step):
        feeds = {k: v[i:i + step] for k, v in inputs.items()} | dict(whole or {})
        for k, v in run(sess, feeds).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) if v[0].ndim else v[-1] for k, v in parts.items()}


def probe(model: Callable[[], object]) -> Callable[[dict[str, int]], str | None]:
    """Whether onnxruntime runs a model on random inputs with the given symbolic dim sizes:
    None when it does, else its message (for :func:`spa.inputs.resolve`). ``model`` makes the
    model (path, bytes or ModelProto) at the first call, when its session is made."""
    made = functools.cache(lambda: session(model(), optimize=False))

    def runs(dims: dict[str, int]) -> str | None:
        feeds = random_inputs(made(), dims=dims)  # a model it cannot load fails here, as always
        try:
            run(made(), feeds)
        except ValidationError as exc:
            return str(exc)
        return None

    return runs


def check_signature(original: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> None:
    if list(original) != list(pruned):
        raise ValidationError(f"output names changed: {list(original)} -> {list(pruned)}")
    for name, a in original.items():
        b = pruned[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise ValidationError(f"output '{name}' changed from {a.dtype}{list(a.shape)} to "
                                  f"{b.dtype}{list(b.shape)}")


@dataclass(frozen=True)
class Closeness:
    max_abs: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale


def closeness(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> Closeness:
    worst, scale = 0.0, 1e-12
    for name, ref in reference.items():
        ref64, oth64 = np.asarray(ref, np.float64), np.asarray(other[name], np.float64)
        if ref64.size:
            worst = max(worst, float(np.max(np.abs(ref64 - oth64))))
            scale = max(scale, float(np.max(np.abs(ref64))))
    return Closeness(worst, scale)


def worst_relative(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]
                   ) -> float:
    """The largest difference of any output of ``other`` from ``reference``'s, relative to
    that output's own scale in ``reference``; inf when an output is missing or changes
    shape (two files that should answer alike: a merged decoder and its branch, a float16
    copy and its plain file)."""
    worst = 0.0
    for name, ref in reference.items():
        got = other.get(name)
        if got is None or got.shape != ref.shape:
            return float("inf")
        if ref.size:
            scale = max(float(np.abs(ref).max()), 1e-30)
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()) / scale)
    return worst


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one dtype and shape hold the same bytes (NaN equal to itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def check_close(reference: dict[str, np.ndarray], pruned: dict[str, np.ndarray], *,
                rtol: float = 1e-4, what: str = "masked original") -> Closeness:
    c = closeness(reference, pruned)
    if c.relative > rtol:
        raise ValidationError(f"pruned outputs differ from the {what}: max |Δ| = {c.max_abs:.3g} "
                              f"at output scale {c.scale:.3g} (relative {c.relative:.2g} > {rtol})")
    return c


def check_exact(reference: dict[str, np.ndarray], pruned: dict[str, np.ndarray],
                names: Iterable[str], *, what: str) -> None:
    """Integer and bool outputs among ``names`` equal the reference's element for element."""
    for name in names:
        ref, got = reference[name], pruned[name]
        if np.issubdtype(ref.dtype, np.floating) or np.array_equal(ref, got):
            continue
        raise ValidationError(f"{ref.dtype} output '{name}' differs from the {what}'s: "
                              f"{_preview(got)} instead of {_preview(ref)}")


def _preview(a: np.ndarray) -> str:
    flat = a.reshape(-1)
    text = ", ".join(str(v) for v in flat[:8]) + (", …" if flat.size > 8 else "")
    return f"[{text}]" if a.ndim else text


def oracle_exemption(analysis: Analysis, plan: Plan) -> str | None:
    """Why pruned ≡ masked original cannot hold for ``plan``, or None when it must."""
    from spa.coupling.analysis import GroupKind

    recipe = plan.recipe
    if recipe is not None and recipe.compensation is not None:
        return "the plan compensates the kept weights (OBSPA update; --no-compensate to check)"
    if recipe is not None and recipe.bias_compensation is not None:
        return "the plan compensates biases for the removed channels"
    if recipe is not None and recipe.reconstruction is not None:
        return ("the plan refits the kept weights on calibration data (--no-reconstruct to "
                "check)")
    by_id = {g.id: g for g in analysis.groups}
    hidden = [gp.name for gp in plan.groups if gp.removed and by_id[gp.id].kind is GroupKind.HIDDEN]
    if hidden:
        return (f"normalisation statistics run over pruned channels (hidden-size group "
                f"{hidden[0]})")
    return None


_SHAPE_READERS = ("Shape", "Size")


def weight_free_outputs(model: onnx.ModelProto) -> set[str]:
    """Graph outputs whose values no floating-point initializer reaches (walking back through
    every node input, but not through what ``Shape``/``Size`` read): shapes and sizes, whose
    values pruning must never change."""
    producer = {o: n for n in model.graph.node for o in n.output}
    float_inits = {i.name for i in model.graph.initializer
                   if i.data_type in _FLOAT_TENSOR_TYPES}
    free = set()
    for out in model.graph.output:
        stack, seen, reached = [out.name], set(), False
        while stack and not reached:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            reached = name in float_inits
            node = producer.get(name)
            if node is not None and node.op_type not in _SHAPE_READERS:
                stack.extend(i for i in node.input if i)
                reached = reached or any(a.type in (onnx.AttributeProto.GRAPH,
                                                    onnx.AttributeProto.GRAPHS)
                                         for a in node.attribute)
        if not reached:
            free.add(out.name)
    return free


_FLOAT_TENSOR_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                       onnx.TensorProto.BFLOAT16}


# Where to zero a weight: (axis, removed indices, the values to write there; None: zeros).
_ZeroSlice: TypeAlias = tuple[int, np.ndarray, np.ndarray | None]


def masked_model(original: onnx.ModelProto, analysis: Analysis, plan: Plan, *,
                 base_dir: Path | None = None) -> onnx.ModelProto:
    """The original model with every removed channel's consumer input-weight slice zeroed.

    ``original`` must be the normal form the analysis ran on (weights as initializers); those
    held in external data are read from ``base_dir`` (the masked ones become inline).
    """
    from spa.coupling.types import Role

    consumer_spaces = {m.space for g in analysis.groups for m in g.members
                       if m.role is Role.CONSUMER}
    zero: dict[str, list[_ZeroSlice]] = {}
    for (name, axis), idx in removed_indices(analysis, plan).items():
        if (name, axis) in consumer_spaces:
            zero.setdefault(name, []).append((axis, idx, None))
    masked = onnx.ModelProto()
    masked.CopyFrom(original)
    _through_dequantize(masked, zero, base_dir)
    through_chains(masked, zero, base_dir)  # Cast → Mul weights
    inits = {init.name: init for init in masked.graph.initializer}
    for name, slices in zero.items():
        init = inits.get(name)
        if init is None:
            continue
        arr = _array(init, base_dir).copy()
        fill = slices[0][2]
        if fill is None:
            fill = np.zeros_like(arr)
        for axis, idx, _ in slices:
            index: list[slice | np.ndarray] = [slice(None)] * arr.ndim
            index[axis] = idx
            arr[tuple(index)] = fill[tuple(index)]
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for name in (z for b in plan.dropped for z in b.zero):  # depth: the branch outputs 0
        arr = np.zeros_like(_array(inits[name], base_dir))
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return masked


def _array(init: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    return numpy_helper.to_array(init, str(base_dir) if base_dir is not None else "")


def _through_dequantize(model: onnx.ModelProto, zero: dict[str, list[_ZeroSlice]],
                        base_dir: Path | None) -> None:
    """A consumer weight that is a ``DequantizeLinear`` output is zeroed in its integer
    tensor, by writing the zero point there: ``(zp − zp) · scale = 0``."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in zero \
                or node.input[0] not in inits:
            continue
        q = _array(inits[node.input[0]], base_dir)
        zp = _array(inits[node.input[2]], base_dir) \
            if len(node.input) > 2 and node.input[2] in inits else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        fill = zero_point_fill(q, zp, axis, block)
        slices = zero.pop(node.output[0])
        zero.setdefault(node.input[0], []).extend((a, idx, fill) for a, idx, _ in slices)
