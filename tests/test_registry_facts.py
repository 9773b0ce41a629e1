"""Every registered op has the facts its rule implies (spa/coupling/facts.py).

An op whose rule gives a weight the CONSUMER role multiplies activations' channels by it: it
needs a MAC term (the cost model counts it) and, unless ``NO_LAYER_INPUT`` says why not, a
layer-input accessor (OBS reads the activation the weight consumes). Which ops do so is read
off the family files with ``ast`` — a registered rule that reaches ``Role.CONSUMER`` through the
functions of its module — so a new op family is checked without being listed here. Then, on
tiny graphs, each accessor must name an activation coupled with the weight it feeds, and each
MAC term must count what the layer computes.
"""

from __future__ import annotations

import ast
from math import prod
from pathlib import Path

import pytest
from graphs import Builder

from spa.api import analyze
from spa.coupling.registry import RULES, ensure_loaded, entry_of
from spa.coupling.types import Role
from spa.metrics import CostModel
from spa.passes.hessian import consumer_layers

FAMILIES = Path(__file__).parents[1] / "spa" / "coupling"
MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"}
NO_LAYER_INPUT = {
    "Einsum": "a contracted letter may be shared by several activations and constants: no one "
              "input X of a layer W·X for OBS (compensation leaves its weights alone)",
    "MatMulNBits": "its consumer weights are packed N-bit blocks: an OBS update would have to be "
                   "re-quantised (compensation leaves quantised weights alone)",
}


def _registered(fn: ast.FunctionDef, tuples: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The ``(domain, op type)`` pairs ``fn``'s ``@register(...)`` decorators name."""
    ops = []
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register":
            domain = next((k.value.value for k in deco.keywords if k.arg == "domain"
                           and isinstance(k.value, ast.Constant)), "")
            for arg in deco.args:
                if isinstance(arg, ast.Constant):
                    ops.append((domain, arg.value))
                elif isinstance(arg, ast.Starred) and isinstance(arg.value, ast.Name):
                    ops += [(domain, op) for op in tuples.get(arg.value.id, [])]
    return ops


def _reach(name: str, calls: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += calls.get(f, set())
    return seen


def consumer_ops_in(source: str) -> set[tuple[str, str]]:
    """Op types registered in ``source`` whose rule reaches ``Role.CONSUMER``."""
    tree = ast.parse(source)
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    tuples = {t.id: [c.value for c in ast.walk(a.value) if isinstance(c, ast.Constant)]
              for a in tree.body if isinstance(a, ast.Assign) for t in a.targets
              if isinstance(t, ast.Name)}
    calls = {n: {c.func.id for c in ast.walk(f) if isinstance(c, ast.Call)
                 and isinstance(c.func, ast.Name) and c.func.id in funcs} for n, f in funcs.items()}
    consumes = {n for n, f in funcs.items() if "Role.CONSUMER" in ast.unparse(f)}
    return {op for n, f in funcs.items() if _reach(n, calls) & consumes
            for op in _registered(f, tuples)}


def consumer_ops() -> set[tuple[str, str]]:
    paths = [*sorted((FAMILIES / "rules").glob("*.py")), FAMILIES / "tied.py"]
    return set().union(*(consumer_ops_in(p.read_text()) for p in paths))


def test_the_scan_finds_the_weighted_layers():
    """The scan is not vacuous: at least the layers with input weights are found."""
    assert {op for _, op in consumer_ops()} >= MAC_OPS


def test_every_consumer_op_has_a_mac_term_and_a_layer_input():
    ensure_loaded()
    missing = []
    for domain, op in sorted(RULES.ops()):
        if (domain, op) not in consumer_ops():
            continue
        for entry in RULES.of_op(domain, op):
            if entry.mac is None:
                missing.append(f"{op}: MAC term")
            if entry.layer_input is None and op not in NO_LAYER_INPUT:
                missing.append(f"{op}: layer-input accessor")
    assert not missing, f"registered ops without a fact their rule needs: {missing}"


def _conv_chain() -> tuple[Builder, str]:
    b = Builder()
    h = b.op("Relu", b.conv("x", 4, 6, name="c0"))
    return b, b.conv_t(b.op("Relu", b.conv(h, 6, 6, name="c1")), 6, 5, name="t2")


def _gemm_chain() -> tuple[Builder, str]:
    b = Builder()
    h = b.op("Relu", b.gemm(b.op("Relu", b.gemm("x", 8, 6, trans_b=0)), 6, 7))
    return b, b.op("Gemm", b.op("Transpose", h, perm=[1, 0]), b.weight(7, 5), transA=1)


def _matmul_chain() -> tuple[Builder, str]:
    b = Builder()
    h = b.op("Relu", b.op("MatMul", "x", b.weight(8, 6)))  # [2, 8, 8] @ [8, 6]
    h = b.op("Transpose", h, perm=[0, 2, 1])
    h = b.op("Relu", b.op("MatMul", b.weight(7, 6), h))  # W [7, 6] @ [2, 6, 8]: X.-2 read
    return b, b.op("MatMul", b.op("Transpose", h, perm=[0, 2, 1]), b.weight(7, 5))


CHAINS = {"conv": (_conv_chain, [1, 4, 8, 8], [1, 5, 8, 8]),
          "gemm": (_gemm_chain, [2, 8], [2, 5]),
          "matmul": (_matmul_chain, [2, 8, 8], [2, 8, 5])}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_layer_inputs_are_the_activations_their_weights_consume(chain):
    build, shape, out = CHAINS[chain]
    b, y = build()
    analysis = analyze(b.model({"x": shape}, {y: out}))
    layers = consumer_layers(analysis)
    checked = 0
    for g in analysis.prunable_groups:
        spaces = {m.space for m in g.members}
        for m in (m for m in g.members if m.role is Role.CONSUMER):
            layer = layers[m.space]
            rank = len(analysis.model.graph.tensors()[layer.data].shape)
            assert (layer.data, layer.data_axis % rank) in spaces, (m.space, layer)
            checked += 1
    assert checked >= 2


def test_mac_terms_count_each_layer():
    """Conv ``|Y|·C·k²``, ConvTranspose ``|X|·O·k²``, Gemm and MatMul ``|Y|·K`` (per node)."""
    b, y = _conv_chain()
    graph = analyze(b.model({"x": [1, 4, 8, 8]}, {y: [1, 5, 8, 8]})).model.graph
    terms = {n.name: entry_of(n, graph.opset).mac(n) for n in graph.nodes
             if n.op in MAC_OPS}
    macs = {name: t.count(*(s for _, s in t.tensors)) for name, t in terms.items()}
    assert macs == {"c0": 6 * 64 * 4 * 9, "c1": 6 * 64 * 6 * 9, "t2": 6 * 64 * 5 * 9}
    assert CostModel(graph).count().flops == sum(macs.values())
    b, y = _matmul_chain()
    graph = analyze(b.model({"x": [2, 8, 8]}, {y: [2, 8, 5]})).model.graph
    assert CostModel(graph).count().flops == \
        prod([2, 8, 6]) * 8 + prod([2, 7, 8]) * 6 + prod([2, 8, 5]) * 7
