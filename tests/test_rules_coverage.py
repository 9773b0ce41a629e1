"""Every registered op rule has a tiny-graph test (STYLE.md: adding an op is one rule and one test).

An op counts as tested when a ``tests/test_rules_*.py`` file builds a node of it: its name is the
first argument of a builder call (``b.op("Relu", …)``, ``helper.make_node("Relu", …)``), a
``Builder`` helper that makes it (``b.conv`` → Conv), or a string in the values of a
``pytest.mark.parametrize`` (directly or through a module-level list it names) that the test
passes on to the builder. The files are read with ``ast``, not run. A new op without such a test
fails here; ``UNTESTED`` lists, with the reason, the ops registered before this check that have
none yet — remove an entry when its test is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

from spa.coupling.registry import RULES, ensure_loaded

TESTS = Path(__file__).parent
BUILDER_CALLS = ("op", "make_node")
HELPERS = {"conv": "Conv", "conv_t": "ConvTranspose", "gemm": "Gemm", "bn": "BatchNormalization",
           "stem": "Conv"}  # Builder methods (tests/graphs.py) and the op each builds
UNTESTED: dict[str, str] = {
    # op: why it has no tiny-graph test of its own yet (each is mapped by a tested rule
    # function shared with its family; a new entry needs a reason).
    "TiedChain": "SPA's own stand-in (domain spa) for a tied view through several layout ops; "
                 "no ONNX file holds it: tests/test_tied_weights.py::"
                 "test_view_through_several_layout_ops_freezes builds the graph that makes it",
}


def _names(node: ast.AST) -> str | None:
    """The called name of a call: ``op`` for ``b.op(…)`` and ``op(…)``."""
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def built_ops(source: str) -> set[str]:
    """Op types a test module builds nodes of (see the module docstring)."""
    tree = ast.parse(source)
    lists = {t.id: a.value for a in tree.body if isinstance(a, ast.Assign)
             for t in a.targets if isinstance(t, ast.Name)}
    ops: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _names(node)
        if name in BUILDER_CALLS and node.args and isinstance(node.args[0], ast.Constant):
            ops.add(node.args[0].value)
        elif name in HELPERS:
            ops.add(HELPERS[name])
        elif name == "parametrize" and len(node.args) >= 2:
            values = node.args[1]
            if isinstance(values, ast.Call) and _names(values) == "list":  # list(FORMS)
                values = values.args[0] if values.args else values
            if isinstance(values, ast.Name):
                values = lists.get(values.id, values)
            ops |= _strings(values)
    return ops


def ops_with_tests() -> set[str]:
    return set().union(*(built_ops(p.read_text()) for p in sorted(TESTS.glob("test_rules_*.py"))))


def registered_ops() -> set[str]:
    ensure_loaded()
    return {op for _, op in RULES.ops()}


def test_every_registered_op_has_a_tiny_graph_test():
    missing = registered_ops() - ops_with_tests() - set(UNTESTED)
    assert not missing, f"op rules without a tiny-graph test in tests/test_rules_*.py: " \
        f"{sorted(missing)}"


def test_the_allow_list_only_names_untested_registered_ops():
    """An entry goes when its op gets a test (or its rule goes)."""
    stale = set(UNTESTED) & ops_with_tests() | set(UNTESTED) - registered_ops()
    assert not stale, f"remove from UNTESTED: {sorted(stale)}"


def test_the_scan_sees_builder_calls_helpers_and_parametrized_names():
    source = '''
UNARY = [("Relu", {}), ("Tanh", {})]
@pytest.mark.parametrize("op", UNARY)
@pytest.mark.parametrize("other", ["Ceil"])
def test_x(op, other):
    b.op("Add", x, y)
    helper.make_node("Mul", [], [])
    b.conv(x, 3, 8)
    assert node.op == "Sub"
'''
    assert built_ops(source) == {"Relu", "Tanh", "Ceil", "Add", "Mul", "Conv"}
