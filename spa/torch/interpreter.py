"""``spa.torch.from_onnx``: any ONNX model as a trainable ``nn.Module``.

For fine-tuning a pruned model whose PyTorch source the user does not have (it came from
TensorFlow, JAX, or a model zoo). The module interprets the graph node by node with torch ops;
every float weight initializer becomes an ``nn.Parameter`` (``module.onnx_tensors()`` maps the
initializer names to them, so gradients map one to one onto the ONNX constants); integer
constants, scalars, masks, BatchNorm running statistics and Resize scales become buffers
(read as torch takes them: 4-bit widened, float8 and bfloat16 bit for bit,
spa/torch/arrays.py).

Why not onnx2torch: it needs torchvision (which has no CPU build to match torch here and fails
to import without stubs), and its parameter names follow its own module tree, not the ONNX
initializers; the gradient criteria need the latter. The op set covers the CNN and transformer
graphs that SPA prunes; an op outside it is reported up front, with every unsupported op
listed, rather than failing mid-forward.

The torch functions are keyed like SPA's op registry, by ``(domain, op_type, opset range)``
(:class:`spa.coupling.registry.OpTable`), and each node runs the function of the model's opset
(Softmax has one before opset 13 and another from it). Each op family lives in its own module,
which registers its functions here with :func:`op` (:func:`ms_op` for onnxruntime's contrib
ops, ``com.microsoft``) when this one imports it, at its end:

- element-wise ops, activations, casts, reductions, ArgMax/ArgMin, TopK, Einsum (math_ops.py);
- convolutions, Gemm, the normalisations and pools, and LSTM, GRU and RNN, which run step by
  step in recurrent.py (nn_ops.py);
- reshaping, layout, slicing, gathers and scatters, constants, Pad (shape_ops.py);
- Resize and Upsample (resize_ops.py);
- the contrib ops that onnxruntime's transformer optimiser fuses into BERT and GPT-2: the
  GELUs, the skip and embedding layer norms, FusedMatMul, FusedConv (contrib_ops.py);
- attention with and without a past (attention_ops.py); rotary embeddings and
  GroupQueryAttention as onnxruntime-genai's LLM graphs use them (decoder_ops.py);
- quantisation (quant_ops.py, qlinear_ops.py), sampling and normalisation (vision_ops.py),
  regions and detection (region_ops.py), signals (signal_ops.py) and the remaining tensor ops
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

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from spa.coupling.registry import ALL_OPSETS, OpTable, domain_key
from spa.errors import UnsupportedOpsError
from spa.ir.dtypes import is_trainable
from spa.torch import recurrent
from spa.torch.arrays import WIDENED, torch_array


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the values ``names`` (untyped: this interpreter
    and onnxruntime take them so, whatever their type)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n)
                             for n in names if n not in present)
    return copy


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


MS = "com.microsoft"


def ms_op(*names: str) -> Callable[[Op], Op]:
    """Decorator: register ``fn`` for each contrib op in ``names`` (any opset)."""
    def deco(fn: Op) -> Op:
        for n in names:
            TORCH_OPS.add(MS, n, ALL_OPSETS, fn)
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
        self._widened: dict[str, int] = {}  # initializer name → its 4-bit type (WIDENED)
        fixed = {n.input[i] for n in control_flow.all_nodes(graph)
                 for i in _FIXED_INPUTS.get(n.op_type, ()) if len(n.input) > i}

        def keep(name: str, init: onnx.TensorProto) -> None:
            self._keep(name, init, trainable=init.name not in fixed)

        for init in graph.initializer:
            keep(init.name, init)
        self._nodes: list[Step] = control_flow.compile_nodes(graph, opset, keep)
        #: the 4-bit values of Constant nodes, with their types (WIDENED)
        self._widened_values = list(_widened_values(self._nodes))
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
        if value in WIDENED:
            self._widened[name] = WIDENED[value]
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
        # a device move or a copy of the module holds new tensors: mark them as 4-bit again
        WIDENED.update({env[name]: code for name, code in self._widened.items()})
        WIDENED.update(self._widened_values)
        env.update(zip(self.input_names, inputs))
        run_nodes(self._nodes, env)
        out = tuple(env[o] for o in self.output_names)
        if capture:
            return out, {name: env[name] for name in capture}
        return out[0] if len(out) == 1 else out


def _widened_values(steps: Sequence[Step]) -> Iterator[tuple[torch.Tensor, int]]:
    """The int4/uint4 tensors among the attributes of ``steps`` (at any depth), with their
    types."""
    for _, _, _, attrs in steps:
        for value in attrs.values():
            if isinstance(value, control_flow.Body):
                yield from _widened_values(value.steps)
            elif isinstance(value, torch.Tensor) and value in WIDENED:
                yield value, WIDENED[value]


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

def ints(t: torch.Tensor | None) -> list[int] | None:
    """The entries of ``t`` as ints (a shape, axes, pads), or None for an absent input."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def int_of(t: torch.Tensor) -> int:
    """The first entry of ``t`` as an int (a scalar input, or one of shape ``[1]``)."""
    return int(t.reshape(-1)[0])


def positive_axis(a: int, rank: int) -> int:
    """Axis ``a`` of a rank-``rank`` tensor, counted from the front."""
    return a + rank if a < 0 else a


def given(x: list, i: int) -> torch.Tensor | None:
    """The optional input ``i`` (None when absent or empty)."""
    return x[i] if len(x) > i and x[i] is not None and x[i].numel() else None


# ---- the op families, in their own modules (they register themselves with ``op``) -----------
import spa.torch.control_flow as control_flow  # noqa: E402
from spa.torch import (  # noqa: E402,F401
    attention_ops,
    contrib_ops,
    decoder_ops,
    math_ops,
    nn_ops,
    qlinear_ops,
    quant_ops,
    region_ops,
    resize_ops,
    shape_ops,
    signal_ops,
    tensor_ops,
    vision_ops,
)
