"""``spa.torch.from_onnx``: any ONNX model as a trainable ``nn.Module``.

For fine-tuning a pruned model whose PyTorch source the user does not have (it came from
TensorFlow, JAX, or a model zoo). The module interprets the graph node by node with torch ops;
every float weight initializer becomes an ``nn.Parameter`` (``module.onnx_tensors()`` maps the
initializer names to them, so gradients map one to one onto the ONNX constants); integer
constants, scalars, masks, BatchNorm running statistics and Resize scales become buffers.

Why not onnx2torch: it needs torchvision (which has no CPU build to match torch here and fails
to import without stubs), and its parameter names follow its own module tree, not the ONNX
initializers; the gradient criteria need the latter. The op set below covers the CNN and
transformer graphs that SPA prunes; an op outside it is reported up front, with every
unsupported op listed, rather than failing mid-forward.

The torch functions are keyed like SPA's op registry, by ``(domain, op_type, opset range)``
(:class:`spa.coupling.registry.OpTable`), and each node runs the function of the model's opset:
Softmax, LogSoftmax and Hardmax before opset 13 flatten the input to 2-D at ``axis`` (default
1) and normalise each row; from 13 on they work along ``axis`` (default -1). ReduceL2 (and
ReduceL1, ReduceSumSquare, ReduceProd, ReduceLogSumExp) reads its axes from the attribute
before opset 18 and from its second input from 18 on. Opset 18's GroupNormalization scales
per group, 21's per channel: a scale of ``num_groups`` entries is spread over each group's
channels. onnxruntime's contrib ops (``com.microsoft``) that its transformer optimiser fuses
into BERT and GPT-2 run too (``EmbedLayerNormalization``, ``SkipLayerNormalization``, the
GELUs), matched against onnxruntime in the tests. LSTM, GRU and RNN run step by step
(spa/torch/recurrent.py). The other op families live in their own modules, each registering
itself here: attention with and without a past (attention_ops.py), rotary embeddings and
GroupQueryAttention as onnxruntime-genai's LLM graphs use them (decoder_ops.py), quantisation
(quant_ops.py, qlinear_ops.py), sampling and normalisation (vision_ops.py), regions and
detection (region_ops.py), signals (signal_ops.py) and the remaining tensor ops
(tensor_ops.py).

Control flow runs too (spa/torch/control_flow.py): If, Loop and Scan, whose subgraphs are
compiled with the module (their outer-scope values become inputs of their node, their float
initializers parameters like the main graph's, their ops checked up front with it), and the
sequence and optional ops (a sequence is a list of tensors, an empty optional None).

``forward(..., capture=names)`` also returns chosen intermediate values of the main graph
(distillation matches them, spa/torch/distill.py); values inside subgraphs are not
capturable.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from spa.coupling.registry import ALL_OPSETS, OpTable, domain_key
from spa.errors import SpaError
from spa.ir.dtypes import is_trainable, onnx_type
from spa.torch import recurrent


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the values ``names`` (untyped: this interpreter
    and onnxruntime take them so, whatever their type)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n)
                             for n in names if n not in present)
    return copy


class UnsupportedOpsError(SpaError):
    """The ONNX model uses ops that spa.torch.from_onnx cannot run in PyTorch."""


#: what a name holds while the graph runs: a tensor, a sequence (a list of tensors), or None
#: (an empty optional, an absent input)
Value: TypeAlias = torch.Tensor | list[torch.Tensor] | None
#: the torch function of an op: (its attributes, its input values) → its output value(s)
Op = Callable[[dict, list], "Value | tuple[Value, ...]"]
TORCH_OPS: OpTable[Op] = OpTable()
#: a node as the module runs it: function, input names (then, for a node with subgraphs, the
#: outer values they read), output names, attributes (subgraphs compiled)
Step = tuple[Op, list[str], list[str], dict]


def add(name: str, fn: Op, opsets: tuple[int, int] = ALL_OPSETS) -> None:
    """Register ``fn`` as the torch function of the default-domain op ``name`` at ``opsets``."""
    TORCH_OPS.add("", name, opsets, fn)


def op(*names: str, opsets: tuple[int, int] = ALL_OPSETS) -> Callable[[Op], Op]:
    """Decorator: register ``fn`` for each op in ``names`` at ``opsets``."""
    def deco(fn: Op) -> Op:
        for n in names:
            add(n, fn, opsets)
        return fn
    return deco


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (the newest onnx knows when it imports none)."""
    versions = [o.version for o in model.opset_import if domain_key(o.domain) == ""]
    return versions[0] if versions else onnx.defs.onnx_opset_version()


def from_onnx(model: str | Path | onnx.ModelProto) -> OnnxModule:
    """A trainable module computing the same function as ``model``."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return OnnxModule(proto)


# float inputs that training must not change: BatchNorm's running mean and variance, and the
# region and scales of a resize (no gradient reaches them: an optimiser would hold them as
# parameters that never move)
_FIXED_INPUTS = {"BatchNormalization": (3, 4), "Resize": (1, 2), "Upsample": (1,)}


class OnnxModule(nn.Module):
    """Interprets an ONNX graph; float initializers are parameters."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        opset = opset_of(model)
        _check_supported(graph, opset)
        self.params = nn.ParameterDict()
        self._attr_of: dict[str, str] = {}
        fixed = {n.input[i] for n in control_flow.all_nodes(graph)
                 for i in _FIXED_INPUTS.get(n.op_type, ()) if len(n.input) > i}

        def keep(name: str, init: onnx.TensorProto) -> None:
            self._keep(name, init, trainable=init.name not in fixed)

        for init in graph.initializer:
            keep(init.name, init)
        self._nodes: list[Step] = control_flow.compile_nodes(graph, opset, keep)
        inits = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        #: input name → the batch size it fixes (an export with a static batch may hold it in
        #: its shapes: run it that many samples at a time, :func:`in_chunks`)
        self.fixed_sizes = {i.name: d[0].dim_value for i in graph.input if i.name not in inits
                            and (d := i.type.tensor_type.shape.dim) and d[0].dim_value > 0}
        sizes = set(self.fixed_sizes.values())
        #: the one batch size the inputs fix; None when none does (or they differ)
        self.fixed_batch = sizes.pop() if len(sizes) == 1 else None
        self.output_names = [o.name for o in graph.output]

    def _keep(self, name: str, init: onnx.TensorProto, *, trainable: bool) -> None:
        """Store ``init`` under ``name``: a parameter if training may change it, else a
        buffer."""
        array = numpy_helper.to_array(init)
        value = torch_array(array)  # int4, float8, bfloat16: ml_dtypes arrays
        key = _key(name, self._attr_of)
        if trainable and is_trainable(array):
            self.params[key] = nn.Parameter(value)
        else:
            self.register_buffer(f"c_{key}", value)

    def onnx_names(self) -> dict[str, str]:
        """Initializer name → the key it is stored under (``params.<key>`` for weights)."""
        return dict(self._attr_of)

    def onnx_tensors(self) -> dict[str, torch.Tensor]:
        """Initializer name → its parameter or buffer (a subgraph's initializer under its
        name, or ``name@k`` when another subgraph's has that name: spa/torch/control_flow.py)."""
        out = {}
        for name, key in self._attr_of.items():
            out[name] = self.params[key] if key in self.params else getattr(self, f"c_{key}")
        return out

    def value_names(self) -> list[str]:
        """The names of the values the main graph's nodes compute, in the order they are
        computed (values inside subgraphs are not among them)."""
        return [name for _, _, outs, _ in self._nodes for name in outs if name]

    def forward(self, *inputs: torch.Tensor, capture: Sequence[str] = ()):
        """The graph outputs (one value, or a tuple of them; a sequence output is a list of
        tensors). With ``capture`` (names of :meth:`value_names`), ``(outputs, {name:
        value})`` with every output in the tuple: distillation reads intermediate values
        through the forward pass, so that wrappers such as DistributedDataParallel see
        them."""
        env: dict[str, Value] = dict(self.onnx_tensors())
        env.update(zip(self.input_names, inputs))
        run_nodes(self._nodes, env)
        out = tuple(env[o] for o in self.output_names)
        if capture:
            return out, {name: env[name] for name in capture}
        return out[0] if len(out) == 1 else out


def run_nodes(steps: Sequence[Step], env: dict[str, Value]) -> None:
    """Run ``steps`` in order on the values of ``env``, adding their outputs to it (the
    main graph's walk, and every subgraph's)."""
    for fn, ins, outs, attrs in steps:
        result = fn(attrs, [env[i] if i else None for i in ins])
        for name, value in zip(outs, result if isinstance(result, tuple) else (result,)):
            if name:
                env[name] = value


def _check_supported(graph: onnx.GraphProto, opset: int) -> None:
    """UnsupportedOpsError listing every op of ``graph`` and its subgraphs that has no torch
    function at ``opset``, or a recurrent node with an activation recurrent.py lacks."""
    nodes = list(control_flow.all_nodes(graph))
    missing = Counter(n.op_type for n in nodes if TORCH_OPS.lookup(n.domain, n.op_type, opset)
                      is None)
    if missing:
        listed = ", ".join(f"{k} ({v}×)" for k, v in sorted(missing.items()))
        raise UnsupportedOpsError(
            f"cannot run in PyTorch at opset {opset}: {listed}; supported: "
            f"{len(TORCH_OPS.ops())} ops (spa.torch.interpreter.TORCH_OPS)")
    for n in nodes:
        if n.op_type in recurrent.GATES and n.domain in ("", "ai.onnx"):
            attrs = attributes(n)
            try:
                recurrent.activations(n.op_type, attrs, recurrent.directions(attrs))
            except ValueError as e:
                raise UnsupportedOpsError(f"node {n.name}: {e}") from None


Answer = tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]  # outputs, captured values


def in_chunks(run: Callable[[list[torch.Tensor]], Answer], batch: list[torch.Tensor],
              fixed: int | None) -> Answer:
    """``run`` on ``batch``, or, when the inputs take ``fixed`` samples at a time, on chunks
    of that many (the last one filled up with copies of its last sample), the answers joined
    on the batch axis; autograd flows through the join, so a step's gradient is the whole
    batch's."""
    n = len(batch[0])
    if fixed is None or n == fixed:
        return run(batch)
    parts: list[Answer] = []
    for start in range(0, n, fixed):
        idx = torch.arange(start, start + fixed).clamp(max=n - 1).to(batch[0].device)
        parts.append(run([t[idx] for t in batch]))
    outs = tuple(torch.cat(o)[:n] for o in zip(*(p[0] for p in parts)))
    mids = {k: torch.cat([p[1][k] for p in parts])[:n] for k in parts[0][1]}
    return outs, mids


def _key(name: str, attr_of: dict[str, str]) -> str:
    key = re.sub(r"\W", "_", name)
    while key in attr_of.values():
        key += "_"
    attr_of[name] = key
    return key


def attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes as its torch function takes them: tensors as torch tensors,
    strings decoded (graphs as they are: control_flow.py compiles them)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = torch_array(numpy_helper.to_array(v))
        elif isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def int_of(t: torch.Tensor) -> int:
    """The first entry of ``t`` as an int (a scalar input, or one of shape ``[1]``)."""
    return int(t.reshape(-1)[0])


def positive_axis(a: int, rank: int) -> int:
    """Axis ``a`` of a rank-``rank`` tensor, counted from the front."""
    return a + rank if a < 0 else a


# ---- arithmetic and activations -------------------------------------------------------------
_BINARY: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow,
    "Max": torch.maximum, "Min": torch.minimum, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And":
    torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "MatMul": torch.matmul,
}
_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin,
    "Cos": torch.cos, "Not": torch.logical_not, "Softplus": F.softplus, "Mish": F.mish,
    "HardSwish": F.hardswish, "Sign": torch.sign, "Round": torch.round,
    "Identity": lambda x: x, "Softsign": F.softsign, "IsNaN": torch.isnan,
    "Tan": torch.tan, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
    "Atanh": torch.atanh,
}
for _name, _fn in _BINARY.items():
    add(_name, (lambda fn: lambda a, x: fn(x[0], x[1]))(_fn))
for _name, _fn in _UNARY.items():
    add(_name, (lambda fn: lambda a, x: fn(x[0]))(_fn))


@op("Div")
def _div(a, x):
    if not x[0].is_floating_point() and not x[1].is_floating_point():
        return torch.div(x[0], x[1], rounding_mode="trunc")
    return x[0] / x[1]


@op("Shrink")
def _shrink(a, x):
    lambd, bias = a.get("lambd", 0.5), a.get("bias", 0.0)
    return torch.where(x[0] < -lambd, x[0] + bias,
                       torch.where(x[0] > lambd, x[0] - bias, torch.zeros_like(x[0])))


@op("Swish")
def _swish(a, x):
    return x[0] * torch.sigmoid(a.get("alpha", 1.0) * x[0])


@op("Where")
def _where(a, x):
    return torch.where(x[0], x[1], x[2])


@op("Sum")
def _sum(a, x):
    out = x[0]
    for t in x[1:]:
        out = out + t
    return out


@op("Mean")
def _mean(a, x):
    return _sum(a, x) / len(x)


@op("Mod")
def _mod(a, x):
    """``fmod=1``: the sign of the dividend (C's fmod); else of the divisor (Python's %)."""
    return torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])


@op("IsInf")
def _isinf(a, x):
    pos = x[0] == float("inf") if a.get("detect_positive", 1) else torch.zeros_like(
        x[0], dtype=torch.bool)
    neg = x[0] == float("-inf") if a.get("detect_negative", 1) else torch.zeros_like(
        x[0], dtype=torch.bool)
    return pos | neg


@op("Selu")
def _selu(a, x):
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma",
                                                                       1.05070102214813232421875)
    return gamma * torch.where(x[0] > 0, x[0], alpha * (torch.exp(x[0]) - 1))


@op("Celu")
def _celu(a, x):
    return F.celu(x[0], a.get("alpha", 1.0))


@op("ThresholdedRelu")
def _thresholded_relu(a, x):
    return torch.where(x[0] > a.get("alpha", 1.0), x[0], torch.zeros_like(x[0]))


@op("LeakyRelu")
def _leaky(a, x):
    return F.leaky_relu(x[0], a.get("alpha", 0.01))


@op("Elu")
def _elu(a, x):
    return F.elu(x[0], a.get("alpha", 1.0))


@op("HardSigmoid")
def _hardsigmoid(a, x):
    return torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)


@op("Gelu")
def _gelu(a, x):
    return F.gelu(x[0], approximate=a.get("approximate", "none"))


@op("Clip")
def _clip(a, x):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return torch.clamp(x[0], lo, hi)


@op("PRelu")
def _prelu(a, x):
    return torch.where(x[0] >= 0, x[0], x[0] * x[1])


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """1 at the first maximum along ``dim``, 0 elsewhere."""
    hot = F.one_hot(x.argmax(dim=dim), x.shape[dim]).to(x.dtype)
    return hot.movedim(-1, dim)


def _along_axis(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Op:
    """Opset 13 on: ``fn`` along ``axis`` (default -1)."""
    return lambda a, x: fn(x[0], a.get("axis", -1))


def _flattened(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Op:
    """Before opset 13: ``fn`` over each row of the input flattened to 2-D at ``axis``
    (default 1), i.e. jointly over the axes ``axis..-1``."""
    def run(a, x):
        axis = positive_axis(a.get("axis", 1), x[0].dim())
        rows = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
        return fn(rows, 1).reshape(x[0].shape)
    return run


_NORMALISE_ROWS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "Softmax": lambda t, dim: torch.softmax(t, dim), "Hardmax": _hardmax,
    "LogSoftmax": lambda t, dim: torch.log_softmax(t, dim)}
for _name, _rows in _NORMALISE_ROWS.items():
    add(_name, _flattened(_rows), (1, 12))
    add(_name, _along_axis(_rows), (13, ALL_OPSETS[1]))


@op("Cast")
def _cast(a, x):
    return x[0].to(torch_dtype(int(a["to"]), "Cast to"))


@op("CastLike")
def _cast_like(a, x):
    return x[0].to(x[1].dtype)


#: ONNX element type → torch dtype, for ops that take a ``dtype``/``to`` attribute
DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32, onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.COMPLEX64: torch.complex64,
    onnx.TensorProto.COMPLEX128: torch.complex128,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    onnx.TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    onnx.TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}


def torch_dtype(code: int, what: str) -> torch.dtype:
    """The torch dtype of ONNX element type ``code``; ``what`` names the op and attribute."""
    if code not in DTYPES:
        raise UnsupportedOpsError(f"{what}={onnx.TensorProto.DataType.Name(code)}")
    return DTYPES[code]


#: element types read bit for bit from their ``ml_dtypes`` arrays
_BIT_VIEWS = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN,
              onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
              onnx.TensorProto.FLOAT8E5M2FNUZ)


def torch_array(array: np.ndarray) -> torch.Tensor:
    """An initializer's values as a torch tensor: int4/uint4 widened to int8/uint8, bfloat16
    and float8 (``ml_dtypes`` arrays, which ``torch.from_numpy`` rejects) bit for bit; other
    ``ml_dtypes`` types (float4, int2) refused."""
    name = array.dtype.name
    if name in ("int4", "uint4"):
        return torch.from_numpy(array.astype(np.int8 if name == "int4" else np.uint8))
    code = onnx_type(array.dtype)
    if code in _BIT_VIEWS:
        bits = np.ascontiguousarray(array).view(np.uint8 if array.itemsize == 1 else np.int16)
        return torch.from_numpy(bits.copy()).view(torch_dtype(code, "an initializer of type"))
    if type(array.dtype).__module__.startswith("ml_dtypes") or array.dtype.kind == "V":
        raise UnsupportedOpsError(f"an initializer of type {name}")
    return torch.from_numpy(np.array(array, copy=True))


# ---- layers ---------------------------------------------------------------------------------
def _conv_pads(a: dict, spatial: int) -> list[int]:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpsError(f"auto_pad={a['auto_pad']} is not supported; export with "
                                  "explicit pads")
    pads = a.get("pads", [0] * (2 * spatial))
    return pads


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list]:
    """Symmetric pads go to the op; asymmetric ones are applied here."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * n


@op("Conv")
def _conv(a, x):
    spatial = x[1].dim() - 2
    inp, pads = _pad_input(x[0], _conv_pads(a, spatial))
    fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return fn(inp, x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", 1),
              padding=pads, dilation=a.get("dilations", 1), groups=a.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(a, x):
    spatial = x[1].dim() - 2
    pads = _conv_pads(a, spatial)
    n = len(pads) // 2
    if pads[:n] != pads[n:]:
        raise UnsupportedOpsError("ConvTranspose with asymmetric pads")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    return fn(x[0], x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", 1),
              padding=pads[:n], output_padding=a.get("output_padding", 0),
              groups=a.get("group", 1), dilation=a.get("dilations", 1))


@op("Gemm")
def _gemm(a, x):
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[1].t() if a.get("transB", 0) else x[1]
    out = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return out


@op("BatchNormalization")
def _batchnorm(a, x):
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False,
                        eps=a.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instancenorm(a, x):
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layernorm(a, x):
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    shape = x[0].shape[axis:]
    return F.layer_norm(x[0], shape, x[1], x[2] if len(x) > 2 else None,
                        eps=a.get("epsilon", 1e-5))


@op("RMSNormalization", "SimplifiedLayerNormalization")
def _rmsnorm(a, x):
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    dims = tuple(range(axis, x[0].dim()))
    ms = x[0].pow(2).mean(dim=dims, keepdim=True)
    return x[0] * torch.rsqrt(ms + a.get("epsilon", 1e-5)) * x[1]


def _pool(a, x, kind: str):
    spatial = x[0].dim() - 2
    kernel = a["kernel_shape"]
    value = -math.inf if kind == "max" else 0.0
    inp, pads = _pad_input(x[0], _conv_pads(a, spatial), value)
    ceil = bool(a.get("ceil_mode", 0))
    strides = a.get("strides", [1] * spatial)
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        return fn(inp, kernel, strides, pads, dilation=a.get("dilations", 1), ceil_mode=ceil)
    avg: Callable[..., torch.Tensor] = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    return avg(inp, kernel, strides, pads, ceil_mode=ceil,
               count_include_pad=bool(a.get("count_include_pad", 0)))


@op("LpPool")
def _lp_pool(a, x):
    """``(Σ |x|^p)^(1/p)`` over each window: an average pool of ``|x|^p`` (zero padding, every
    position counted) times the window's size."""
    p = float(a.get("p", 2))
    powered = {**a, "count_include_pad": 1}
    total = _pool(powered, [x[0].abs().pow(p)], "avg") * float(np.prod(a["kernel_shape"]))
    return total.pow(1.0 / p)


@op("GlobalLpPool")
def _global_lp_pool(a, x):
    p = float(a.get("p", 2))
    return x[0].abs().pow(p).sum(dim=tuple(range(2, x[0].dim())), keepdim=True).pow(1.0 / p)


add("MaxPool", lambda a, x: _pool(a, x, "max"))
add("AveragePool", lambda a, x: _pool(a, x, "avg"))
add("GlobalAveragePool", lambda a, x: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True))
add("GlobalMaxPool", lambda a, x: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True))
add("Dropout", lambda a, x: x[0])


# ---- shapes, layout, indexing ---------------------------------------------------------------
@op("Flatten")
def _flatten(a, x):
    axis = positive_axis(a.get("axis", 1), x[0].dim())
    return x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)


@op("Reshape")
def _reshape(a, x):
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


@op("Transpose")
def _transpose(a, x):
    return x[0].permute(a.get("perm", list(range(x[0].dim()))[::-1]))


def _axes_input(a, x) -> list[int] | None:
    return _ints(x[1]) if len(x) > 1 and x[1] is not None else None


def _axes_attribute(a, x) -> list[int] | None:
    return a.get("axes")


def _axes(a, x) -> list[int] | None:
    """From the second input (Squeeze/Unsqueeze/ReduceSum from opset 13, the other reductions
    from 18) when present, else from the attribute."""
    axes = _axes_input(a, x)
    return _axes_attribute(a, x) if axes is None else axes


@op("Squeeze")
def _squeeze(a, x):
    axes = _axes(a, x)
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(positive_axis(i, x[0].dim()) for i in axes))


@op("Unsqueeze")
def _unsqueeze(a, x):
    out = x[0]
    rank = out.dim() + len(_axes(a, x))
    for ax in sorted(positive_axis(i, rank) for i in _axes(a, x)):
        out = out.unsqueeze(ax)
    return out


@op("Concat")
def _concat(a, x):
    return torch.cat([t for t in x if t is not None], dim=a["axis"])


@op("Split")
def _split(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        n = a["num_outputs"]
        sizes = [math.ceil(x[0].shape[axis] / n)] * n
        sizes[-1] = x[0].shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x[0], sizes, dim=axis))


@op("Slice")
def _slice(a, x):
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = x[0]
    for ax, s, e, st in zip(axes, starts, ends, steps):
        dim = positive_axis(ax, out.dim())
        n = out.shape[dim]
        s, e = s + n if s < 0 else s, e + n if e < 0 else e
        if st > 0:
            s, e = max(min(s, n), 0), max(min(e, n), 0)
        else:  # ONNX clamps backwards slices to [-1, n-1]; torch has no negative steps
            s, e = max(min(s, n - 1), -1), max(min(e, n - 1), -1)
        picked = torch.arange(s, e, st, device=out.device)
        out = torch.index_select(out, dim, picked)
    return out


@op("Gather")
def _gather(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    out = torch.index_select(x[0], axis, idx.reshape(-1))
    return out.reshape((*x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1:]))  # () too


@op("GatherElements")
def _gather_elements(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    idx = x[1].long()
    return torch.gather(x[0], axis, torch.where(idx < 0, idx + x[0].shape[axis], idx))


@op("GatherND")
def _gather_nd(a, x):
    """Index tuples of length k in the last axis of ``indices`` pick slices of ``data``;
    the first ``batch_dims`` axes of both are matched one to one (flattened to one here)."""
    data, idx = x[0], x[1].long()
    b, k = a.get("batch_dims", 0), x[1].shape[-1]
    batch = int(np.prod(data.shape[:b]))
    dims = data.shape[b:b + k]
    rest = data.shape[b + k:]
    flat = data.reshape(batch, int(np.prod(dims)), *rest)
    tuples = idx.reshape(batch, -1, k)
    size = torch.tensor(dims, dtype=torch.long, device=idx.device)
    tuples = torch.where(tuples < 0, tuples + size, tuples)
    strides = torch.tensor([int(np.prod(dims[j + 1:])) for j in range(k)], dtype=torch.long,
                           device=idx.device)
    linear = (tuples * strides).sum(-1)
    rows = torch.arange(batch, device=idx.device).unsqueeze(1)
    return flat[rows, linear].reshape(*idx.shape[:-1], *rest)


@op("ScatterND")
def _scatter_nd(a, x):
    """A copy of ``data`` with the slices that index tuples (the last axis of ``indices``)
    pick replaced by ``updates``, or combined with them (``reduction``: add, mul, max, min;
    BART's and T5's decoders shift their labels right with one)."""
    data, idx, updates = x[0], x[1].long(), x[2]
    k = idx.shape[-1]
    dims, rest = data.shape[:k], data.shape[k:]
    size = torch.tensor(dims, dtype=torch.long, device=idx.device)
    tuples = idx.reshape(-1, k)
    tuples = torch.where(tuples < 0, tuples + size, tuples)
    strides = torch.tensor([int(np.prod(dims[j + 1:])) for j in range(k)], dtype=torch.long,
                           device=idx.device)
    linear = (tuples * strides).sum(-1)
    flat = data.reshape(int(np.prod(dims)), *rest).clone()
    values = updates.reshape(len(linear), *rest).to(flat.dtype)
    how = a.get("reduction", "none")
    if how == "none":
        flat[linear] = values
    elif how == "add":
        flat = flat.index_put((linear,), values, accumulate=True)
    elif how in ("mul", "max", "min"):
        with warnings.catch_warnings():  # "index_reduce() is in beta"
            warnings.simplefilter("ignore", UserWarning)
            flat = flat.index_reduce(0, linear, values,
                                     {"mul": "prod", "max": "amax", "min": "amin"}[how])
    else:
        raise UnsupportedOpsError(f"ScatterND reduction {how}")
    return flat.reshape(data.shape)


@op("Shape")
def _shape(a, x):
    dims = list(x[0].shape)
    rank = len(dims)
    lo = positive_axis(a.get("start", 0), rank)
    hi = positive_axis(a["end"], rank) if "end" in a else rank
    return torch.tensor(dims[max(lo, 0):min(hi, rank)], dtype=torch.int64)


@op("Expand")
def _expand(a, x):
    shape = torch.broadcast_shapes(x[0].shape, tuple(_ints(x[1])))
    return x[0].expand(shape)


@op("Tile")
def _tile(a, x):
    return x[0].repeat(*_ints(x[1]))


@op("ConstantOfShape")
def _constant_of_shape(a, x):
    value = a.get("value", torch.zeros(1))
    return torch.full(_ints(x[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


@op("Constant")
def _constant(a, x):
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64),
                       ("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise UnsupportedOpsError(f"Constant with attributes {sorted(a)}")


@op("Range")
def _range(a, x):
    return torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)


def _reduce(fn, axes_of: Callable[[dict, list], list[int] | None] = _axes):
    def run(a, x):
        axes = axes_of(a, x)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        return fn(x[0], dim=tuple(axes), keepdim=keep)
    return run


def _log_sum(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.log(t.sum(dim=dim, keepdim=keepdim))


def _l2(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(t, 2, dim=dim, keepdim=keepdim)


# ReduceL2 takes its axes from an attribute before opset 18, from its second input from 18 on.
def _l1(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return t.abs().sum(dim=dim, keepdim=keepdim)


def _sum_square(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return (t * t).sum(dim=dim, keepdim=keepdim)


def _prod(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dim, reverse=True):
        t = t.prod(dim=d, keepdim=keepdim)
    return t


# ReduceL2 takes its axes from an attribute before opset 18, from its second input from 18 on
# (as do ReduceL1, ReduceSumSquare, ReduceProd and ReduceLogSumExp).
for _name, _fn in (("ReduceL2", _l2), ("ReduceL1", _l1), ("ReduceSumSquare", _sum_square),
                   ("ReduceProd", _prod), ("ReduceLogSumExp", torch.logsumexp),
                   ("ReduceLogSum", _log_sum)):
    add(_name, _reduce(_fn, _axes_attribute), (1, 17))
    add(_name, _reduce(_fn, _axes_input), (18, ALL_OPSETS[1]))
add("ReduceMean", _reduce(torch.mean))
add("ReduceSum", _reduce(torch.sum))
add("ReduceMax", _reduce(torch.amax))
add("ReduceMin", _reduce(torch.amin))


def _arg(largest: bool) -> Op:
    """ArgMax / ArgMin (indices: not differentiable; exports that pick by score read them)."""
    def run(a, x):
        axis = positive_axis(a.get("axis", 0), x[0].dim())
        t = x[0].flip(axis) if a.get("select_last_index", 0) else x[0]
        idx = t.argmax(axis, keepdim=True) if largest else t.argmin(axis, keepdim=True)
        if a.get("select_last_index", 0):
            idx = x[0].shape[axis] - 1 - idx
        return idx if a.get("keepdims", 1) else idx.squeeze(axis)
    return run


add("ArgMax", _arg(True))
add("ArgMin", _arg(False))


@op("TopK")
def _topk(a, x):
    k = int(x[1].reshape(-1)[0]) if len(x) > 1 else int(a["k"])
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    values, idx = torch.topk(x[0], k, dim=axis, largest=bool(a.get("largest", 1)),
                             sorted=True)
    return values, idx


@op("Size")
def _size(a, x):
    return torch.tensor(x[0].numel(), dtype=torch.int64)


@op("DepthToSpace")
def _depth_to_space(a, x):
    b = int(a["blocksize"])
    n, c, h, w = x[0].shape
    if a.get("mode", "DCR") == "DCR":
        t = x[0].reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        t = x[0].reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def _space_to_depth(a, x):
    b = int(a["blocksize"])
    n, c, h, w = x[0].shape
    t = x[0].reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return t.reshape(n, c * b * b, h // b, w // b)


@op("ScatterElements", "Scatter")  # Scatter (opsets 9-10): ScatterElements by its old name
def _scatter_elements(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    how = a.get("reduction", "none")
    if how == "none":
        return x[0].scatter(axis, idx, x[2])
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(how)
    if reduce is None:
        raise UnsupportedOpsError(f"ScatterElements reduction {how}")
    return x[0].scatter_reduce(axis, idx, x[2], reduce)


@op("GroupNormalization")
def _group_norm(a, x):
    """Opset 18 gives one scale and bias per group, 21 one per channel."""
    groups, eps = int(a["num_groups"]), a.get("epsilon", 1e-5)
    n, c = x[0].shape[:2]
    t = x[0].reshape(n, groups, -1)
    mean = t.mean(-1, keepdim=True)
    var = t.var(-1, unbiased=False, keepdim=True)
    t = ((t - mean) / torch.sqrt(var + eps)).reshape(x[0].shape)
    scale, bias = x[1], x[2]
    if scale.numel() == groups and groups != c:
        scale, bias = (v.repeat_interleave(c // groups) for v in (scale, bias))
    view = (1, c) + (1,) * (x[0].dim() - 2)
    return t * scale.reshape(view) + bias.reshape(view)


@op("LpNormalization")
def _lp_norm(a, x):
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    p = int(a.get("p", 2))
    return x[0] / torch.linalg.vector_norm(x[0], p, dim=axis, keepdim=True)


@op("Pad")
def _pad(a, x):
    mode = a.get("mode", "constant")
    pads = _ints(x[1]) if len(x) > 1 else a["pads"]
    value = x[2].item() if len(x) > 2 and x[2] is not None else a.get("value", 0.0)
    if len(x) > 3 and x[3] is not None:
        raise UnsupportedOpsError("Pad with explicit axes")
    n = len(pads) // 2
    flat = []
    for b, e in zip(reversed(pads[:n]), reversed(pads[n:])):
        flat += [b, e]
    return F.pad(x[0], flat, mode=mode, value=value if mode == "constant" else None)


@op("Resize", opsets=(10, 10))
def _resize_10(a, x):
    """Opset 10's Resize takes (X, scales): no region, no sizes, asymmetric coordinates."""
    return _resize({"coordinate_transformation_mode": "asymmetric",
                    "nearest_mode": "floor", **a}, [x[0], None, x[1]])


@op("Resize", opsets=(11, ALL_OPSETS[1]))
def _resize(a, x):
    """Nearest and linear resizes, axis by axis, with every coordinate mapping of the spec but
    ``tf_crop_and_resize`` and ``half_pixel_symmetric``, and every ``nearest_mode``: source
    positions computed as onnxruntime computes them (torch's interpolate maps half-pixel
    only, and its nearest is ``asymmetric`` rounded down: TF1 exports' ``asymmetric`` linear
    resizes came out wrong). Output lengths: ``sizes``, else ``⌊length · scale⌋``."""
    mode = a.get("mode", "nearest")
    coords = a.get("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear") or coords not in _COORDS \
            or a.get("antialias", 0) or a.get("axes") is not None \
            or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedOpsError(f"Resize mode {mode}, coordinate_transformation_mode {coords}"
                                  " (antialias, axes and keep_aspect_ratio_policy unset only)")
    sizes = _ints(given(x, 3))
    scales = [float(s) for s in given(x, 2).reshape(-1).tolist()] if sizes is None else \
        [m / n for m, n in zip(sizes, x[0].shape)]
    out = sizes or [int(math.floor(n * s)) for n, s in zip(x[0].shape, scales)]
    nearest = a.get("nearest_mode", "round_prefer_floor") if mode == "nearest" else None
    return _resampled(x[0], out, scales, coords, nearest)


@op("Upsample")
def _upsample(a, x):
    """Opset 7–9 (Resize's predecessor): scales by attribute (7) or input (9), nearest
    (rounded down) or linear, asymmetric coordinates."""
    scales = [float(s) for s in (a["scales"] if "scales" in a else x[1].reshape(-1).tolist())]
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise UnsupportedOpsError(f"Upsample mode {mode}")
    out = [int(math.floor(n * s)) for n, s in zip(x[0].shape, scales)]
    return _resampled(x[0], out, scales, "asymmetric", "floor" if mode == "nearest" else None)


# source position of output index i, from (i, input length, output length, scale)
_COORDS: dict[str, Callable[[torch.Tensor, int, int, float], torch.Tensor]] = {
    "half_pixel": lambda i, n, m, s: (i + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda i, n, m, s: (i + 0.5) / s - 0.5 if m > 1 else i * 0.0,
    "align_corners": lambda i, n, m, s: i * ((n - 1) / (m - 1)) if m > 1 else i * 0.0,
    "asymmetric": lambda i, n, m, s: i / s,
}
_ROUND: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _resampled(t: torch.Tensor, sizes: list[int], scales: list[float], coords: str,
               nearest: str | None) -> torch.Tensor:
    """``t`` resampled to ``sizes`` axis by axis: source positions by ``coords``; the
    ``nearest`` rounding of them, else linear between the two neighbours (positions clamped to
    the input)."""
    if nearest is not None and nearest not in _ROUND:
        raise UnsupportedOpsError(f"Resize nearest_mode {nearest}")
    fast = _interpolated(t, sizes, scales, coords, nearest)
    if fast is not None:
        return fast
    for axis, (n, m, s) in enumerate(zip(t.shape, sizes, scales)):
        if n == m:
            continue
        pos = _COORDS[coords](torch.arange(m, dtype=torch.float64), n, m, s)
        if nearest is not None:
            t = t.index_select(axis, _ROUND[nearest](pos).clamp(0, n - 1).long())
            continue
        pos = pos.clamp(0, n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        w = (pos - lo).to(t.dtype).reshape([-1 if d == axis else 1 for d in range(t.dim())])
        t = t.index_select(axis, lo) * (1 - w) + t.index_select(axis, hi) * w
    return t


def _interpolated(t: torch.Tensor, sizes: list[int], scales: list[float], coords: str,
                  nearest: str | None) -> torch.Tensor | None:
    """``F.interpolate`` where it computes the positions of :func:`_resampled` (forward and
    backward ×2.3 faster for a bilinear 2× upsample, benchmarks/from_onnx_resize.py): batch
    and channels kept, each spatial
    scale the size ratio; linear with half-pixel positions, or nearest rounded down from
    asymmetric ones at a power-of-two factor (where ``i · n/m`` is exact in float32). Not
    corner-aligned positions: torch computes their step ``(n-1)/(m-1)`` in float32, 6e-6
    relative off onnxruntime's values on a 4×6 map. None elsewhere."""
    rank, shape = t.dim(), list(t.shape)
    if rank not in (3, 4, 5) or not t.is_floating_point() or sizes[:2] != shape[:2] \
            or any(s != m / n for n, m, s in zip(shape[2:], sizes[2:], scales[2:])):
        return None
    if nearest is None and (coords == "half_pixel"
                            or coords == "pytorch_half_pixel" and min(sizes[2:]) > 1):
        mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        return F.interpolate(t, size=sizes[2:], mode=mode, align_corners=False)
    powers = all(m % n == 0 and (m // n) & (m // n - 1) == 0
                 for n, m in zip(shape[2:], sizes[2:]))
    if nearest == "floor" and coords == "asymmetric" and powers:
        return F.interpolate(t, size=sizes[2:], mode="nearest")
    return None


@op("Einsum")
def _einsum(a, x):
    return torch.einsum(a["equation"], *x)


@op("Trilu")
def _trilu(a, x):
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)


@op("LSTM")
def _lstm(a, x):
    return recurrent.run("LSTM", a, x)


@op("GRU")
def _gru(a, x):
    return recurrent.run("GRU", a, x)


@op("RNN")
def _rnn(a, x):
    return recurrent.run("RNN", a, x)


# ---- onnxruntime's contrib ops (com.microsoft), as its transformer optimiser fuses them -----
MS = "com.microsoft"


def ms_op(*names: str) -> Callable[[Op], Op]:
    """Decorator: register ``fn`` for each contrib op in ``names`` (any opset)."""
    def deco(fn: Op) -> Op:
        for n in names:
            TORCH_OPS.add(MS, n, ALL_OPSETS, fn)
        return fn
    return deco


def given(x: list, i: int) -> torch.Tensor | None:
    """The optional input ``i`` (None when absent or empty)."""
    return x[i] if len(x) > i and x[i] is not None and x[i].numel() else None


def _biased(x: list) -> torch.Tensor:
    bias = given(x, 1)
    return x[0] if bias is None else x[0] + bias


ms_op("Gelu")(lambda a, x: F.gelu(x[0]))
ms_op("BiasGelu")(lambda a, x: F.gelu(_biased(x)))
ms_op("FastGelu")(lambda a, x: F.gelu(_biased(x), approximate="tanh"))
ms_op("QuickGelu")(lambda a, x: x[0] * torch.sigmoid(a.get("alpha", 1.702) * x[0]))


def _skip_sum(x: list) -> torch.Tensor:
    """SkipLayerNormalization's input + skip (+ bias, its fifth input)."""
    total = x[0] + x[1]
    bias = given(x, 4)
    return total if bias is None else total + bias


@ms_op("SkipLayerNormalization")
def _skip_layernorm(a, x):
    """Outputs: the normalised sum, its mean and inverse standard deviation, the sum."""
    total = _skip_sum(x)
    mean = total.mean(-1, keepdim=True)
    inv = torch.rsqrt(total.var(-1, unbiased=False, keepdim=True) + a.get("epsilon", 1e-12))
    out = (total - mean) * inv * x[2]
    beta = given(x, 3)
    return (out if beta is None else out + beta), mean, inv, total


@ms_op("FusedMatMul")
def _fused_matmul(a, x):
    """``alpha · op(A) @ op(B)``, ``transA``/``transB`` swapping the last two axes (the
    batch transposes, ``transBatchA``/``transBatchB``, are not run)."""
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        raise UnsupportedOpsError("FusedMatMul with transBatchA or transBatchB")
    A = x[0].transpose(-1, -2) if a.get("transA", 0) else x[0]
    B = x[1].transpose(-1, -2) if a.get("transB", 0) else x[1]
    return (A @ B) * a.get("alpha", 1.0)


@ms_op("FusedConv")
def _fused_conv(a, x):
    """onnxruntime's Conv with its activation fused: ``act(conv(X, W, B) + Z)``."""
    y = _conv(a, x[:3])
    z = given(x, 3)
    y = y if z is None else y + z
    name = a.get("activation")
    params = list(a.get("activation_params", []))
    if name is None:
        return y
    if name == "Clip":
        return torch.clamp(y, params[0], params[1])
    fn = recurrent.activation(name, *params[:2])  # LeakyRelu's alpha, HardSigmoid's alpha, beta
    if fn is None:
        raise UnsupportedOpsError(f"FusedConv activation {name}")
    return fn(y)


@ms_op("SkipSimplifiedLayerNormalization")
def _skip_rmsnorm(a, x):
    """Outputs: the RMS-normalised sum (input, skip, gamma, bias), unused, the inverse RMS,
    the sum."""
    total = x[0] + x[1]
    bias = given(x, 3)
    total = total if bias is None else total + bias
    inv = torch.rsqrt((total * total).mean(-1, keepdim=True) + a.get("epsilon", 1e-12))
    return total * inv * x[2], inv, inv, total


@ms_op("EmbedLayerNormalization")
def _embed_layernorm(a, x):
    """Word + position (+ segment) embeddings, layer-normalised; the mask index (the count of
    ones of each row of the mask, int32); the sum before the norm."""
    ids = x[0].long()
    n, s = ids.shape
    positions = given(x, 8)
    pos = (torch.arange(s, device=ids.device).expand(n, s) if positions is None
           else positions.long().expand(n, s))
    total = F.embedding(ids, x[2]) + F.embedding(pos, x[3])
    segments, table = given(x, 1), given(x, 4)
    if segments is not None and table is not None:
        total = total + F.embedding(segments.long(), table)
    out = F.layer_norm(total, total.shape[-1:], x[5], x[6], eps=a.get("epsilon", 1e-12))
    mask = given(x, 7)
    count = (mask.ne(0).sum(-1) if mask is not None
             else torch.full((n,), s, device=ids.device)).to(torch.int32)
    return out, count, total


# ---- ops kept in their own modules (they register themselves with ``op``) -------------------
import spa.torch.control_flow as control_flow  # noqa: E402
from spa.torch import (  # noqa: E402,F401
    attention_ops,
    decoder_ops,
    qlinear_ops,
    quant_ops,
    region_ops,
    signal_ops,
    tensor_ops,
    vision_ops,
)
