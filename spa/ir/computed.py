"""Weights computed at run time from constants, folded into constants (normal form).

Some exports compute a layer's weight in the graph from stored parameters instead of storing
it: weight standardisation (timm's NF-Nets and BiT: the weight normalised per output channel
by a ``BatchNormalization`` in training mode, then scaled by a gain), weight normalisation
(``g · v / ‖v‖``), a parametrisation left in the graph. No rule can slice such a weight, since
no layer reads a constant, so every channel it touches freezes ("the weight is no constant").

The tensors computed from constants alone that a layer (:data:`LAYERS`) reads, or that is
added to a weighted layer's output (its bias), are *computed weights* (torchvision's Swin V2
zeroes the key's third of its ``qkv`` bias in the graph, a ``ScatterND``);
:func:`fold_computed_weights` evaluates them with onnxruntime, which runs the model, so each
becomes the constant the model used anyway (the same kernels, the same values),
and the ops that made it are left with no reader. Only what a layer reads is folded: shape
arithmetic, position tables and attention masks made from constants are spa/ir/fold.py's
concern, and stay as they are here. A computed weight is folded only when its type is a float
type and it holds no more values than the constants it is made from (a ``Tile`` of one filter
would grow the file). A quantised weight's dequantising chain is never folded
(``DequantizeLinear``, or a ``Cast`` of integers that spa/ir/quant_chain.py reads as one): the
model stays integer. Nor are ops of other domains, ops holding subgraphs, and random ops.
Folding changes the layers' output shapes that inference could not tell before, so the
loader infers shapes again (spa/ir/load.py).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.ir.dtypes import is_floating, onnx_type
from spa.ir.fold import redirect
from spa.ir.quant_chain import DEFAULT_DOMAINS, starts_chain

log = logging.getLogger(__name__)

LAYERS = frozenset(("Conv", "ConvTranspose", "Gemm", "MatMul"))  # the readers of weights
_NEVER = frozenset(("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear",
                    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli", "Constant"))


def _foldable(node: gs.Node) -> bool:
    return ((node.domain or "") in DEFAULT_DOMAINS and node.op not in _NEVER
            and not starts_chain(node)
            and not any(isinstance(v, gs.Graph) or (isinstance(v, list) and v
                                                      and isinstance(v[0], gs.Graph))
                        for v in node.attrs.values()))


def _reads_weights(node: gs.Node, made: Collection[str]) -> bool:
    """A layer (:data:`LAYERS`), or the ``Add`` of a layer's bias: its other input is the
    output of a layer with a weight (a constant, or one ``made`` of constants), as exporters
    add a MatMul's bias; not a mask added to attention scores (a product of activations)."""
    if (node.domain or "") not in DEFAULT_DOMAINS:
        return False
    if node.op in LAYERS:
        return True
    return node.op == "Add" and any(
        len(t.inputs) == 1 and t.inputs[0].op in LAYERS
        and any(isinstance(w, gs.Constant) or w.name in made for w in t.inputs[0].inputs)
        for t in node.inputs if isinstance(t, gs.Variable) and t.name not in made)


def _made_of(t: gs.Tensor, made: dict[str, gs.Node]) -> tuple[list[gs.Node], list[gs.Constant]]:
    """The nodes (in graph order) and constants the computed tensor ``t`` is made from."""
    nodes: dict[int, gs.Node] = {}
    leaves: dict[str, gs.Constant] = {}
    todo = [t]
    while todo:
        x = todo.pop()
        if isinstance(x, gs.Constant):
            leaves[x.name] = x
            continue
        node = made[x.name]
        if id(node) not in nodes:
            nodes[id(node)] = node
            todo.extend(i for i in node.inputs if i.name)
    return list(nodes.values()), list(leaves.values())


def computed_weights(graph: gs.Graph) -> list[tuple[gs.Variable, list[gs.Node], int]]:
    """The computed weights of ``graph`` (see the module): each with the nodes that make it and
    how many values its constants hold."""
    made: dict[str, gs.Node] = {}  # computed tensor -> its producer
    for node in graph.nodes:  # topological order
        ins = [t for t in node.inputs if t.name]
        if ins and _foldable(node) and all(isinstance(t, gs.Constant) or t.name in made
                                           for t in ins):
            made.update((o.name, node) for o in node.outputs)
    outputs = {t.name for t in graph.outputs}
    found: list[tuple[gs.Variable, list[gs.Node], int]] = []
    for node in graph.nodes:
        if not _reads_weights(node, made):
            continue
        for t in node.inputs:
            if not isinstance(t, gs.Variable) or t.name not in made or t.name in outputs \
                    or any(t is f[0] for f in found):
                continue
            if t.dtype is not None and not is_floating(onnx_type(t.dtype)):
                continue
            nodes, leaves = _made_of(t, made)
            found.append((t, nodes, sum(int(np.prod(c.shape, dtype=np.int64)) for c in leaves)))
    return found


def fold_computed_weights(graph: gs.Graph, name: str = "model") -> int:
    """Replace each computed weight of ``graph`` by its value (see the module); how many."""
    found = computed_weights(graph)
    if not found:
        return 0
    values = _evaluated(graph, found)
    folded = 0
    for (t, _, held), value in zip(found, values):
        if value is None or value.size > held or not is_floating(onnx_type(value.dtype)):
            continue
        const = gs.Constant(t.name, np.array(value))
        producer = t.inputs[0]
        producer.outputs[producer.outputs.index(t)] = gs.Variable(f"{t.name}/unread")
        redirect(t, const)
        folded += 1
    if folded:  # the file's parameter count (the report's "before") holds what made them
        log.warning("note: %s: %d weights the graph computes from constants were folded into "
                    "constants (written so)", name, folded)
    return folded


def _evaluated(graph: gs.Graph, found: list[tuple[gs.Variable, list[gs.Node], int]]
               ) -> list[np.ndarray | None]:
    """The values of the computed weights in ``found``, from one onnxruntime run of the nodes
    that make them (None for all when onnxruntime cannot run them)."""
    import onnxruntime as ort

    order = {id(n): k for k, n in enumerate(graph.nodes)}
    nodes = sorted({id(n): n for _, made, _ in found for n in made}.values(),
                   key=lambda n: order[id(n)])
    sub = gs.Graph(nodes=nodes, inputs=[], outputs=[t for t, _, _ in found],
                   opset=graph.opset, import_domains=graph.import_domains)
    model = gs.export_onnx(sub, do_type_check=False)
    for o in model.graph.output:  # onnxruntime gives each its own type
        o.CopyFrom(onnx.helper.make_empty_tensor_value_info(o.name))
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return list(session.run(None, {}))
    except Exception as exc:  # noqa: BLE001 - an op onnxruntime cannot run: nothing is folded
        log.info("weights computed from constants stay computed: %s", exc)
        return [None] * len(found)
