"""``spa.torch.from_onnx`` runs ONNX's control flow and sequence ops as onnxruntime does.

If, Loop and Scan on tiny graphs written in ONNX's text format, their subgraphs reading outer
values and holding initializers of their own: every output against onnxruntime, gradients
into the parameters the branch taken and the iterations use, a loss trained down through a
Loop. Then a TorchScript export with a data-dependent loop and branch, each sequence and
optional op, and unsupported ops inside subgraphs reported up front. Before
spa/torch/control_flow.py, from_onnx refused every model with one of these nodes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx.parser
import pytest

torch = pytest.importorskip("torch")

import spa.torch as st  # noqa: E402
from spa import validate as val  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 18, "my.ops" : 1]>\n'
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3)).astype(np.float32)


def _model(text: str, header: str = HEADER) -> onnx.ModelProto:
    return onnx.parser.parse_model(header + text)


def _floats(values: np.ndarray) -> str:
    return ", ".join(f"{v:.6f}" for v in values.reshape(-1))


def _agrees(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> st.OnnxModule:
    """The module's outputs (tensors or sequences) are onnxruntime's; returns the module."""
    expected = val.run(val.session(model), feeds)
    module = st.from_onnx(model)
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    got = got if len(module.output_names) > 1 else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected.values()):
        pairs = list(zip(g, e, strict=True)) if isinstance(e, list) else [(g, e)]
        for gi, ei in pairs:
            gi = gi.detach().numpy()  # an input or a parameter passed through: as it is
            assert gi.shape == ei.shape and gi.dtype == ei.dtype
            np.testing.assert_allclose(gi, ei, rtol=1e-6, atol=1e-6)
    return module


def _parameters(module: st.OnnxModule) -> dict[str, torch.nn.Parameter]:
    return {n: t for n, t in module.onnx_tensors().items() if isinstance(t, torch.nn.Parameter)}


# ---- If -------------------------------------------------------------------------------------
W = RNG.standard_normal((3, 3)).astype(np.float32)
IF = _model(f'''
agraph (bool cond, float[2, 3] x) => (float[2, 3] y) <float[3, 3] W = {{{_floats(W)}}}> {{
  h = Relu(x)
  y = If(cond) <
    then_branch = then_g () => (float[2, 3] t) <float[3] a = {{1.0, 2.0, 3.0}}> {{
      m = MatMul(h, W)
      t = Add(m, a)
    }},
    else_branch = else_g () => (float[2, 3] e) <float[3] b = {{0.5, -1.0, 2.0}}> {{
      e = Mul(h, b)
    }}
  >
}}''')


@pytest.mark.parametrize("cond", [True, False])
def test_if_runs_the_branch_its_condition_picks_and_trains_it(cond):
    """The branches read ``h`` and the outer weight ``W`` and hold initializers of their own:
    parameters of the module, by name; the gradient reaches those the branch taken uses."""
    module = _agrees(IF, {"cond": np.array(cond), "x": X})
    params = _parameters(module)
    assert set(params) == {"W", "a", "b"}
    assert module.value_names() == ["h", "y"]
    (y,), mids = module(torch.tensor(cond), torch.from_numpy(X), capture=["h"])
    h = np.maximum(X, 0)
    np.testing.assert_allclose(mids["h"].numpy(), h)
    y.sum().backward()
    ones = np.ones((2, 3), np.float32)
    expected = {"W": h.T @ ones, "a": ones.sum(0), "b": None} if cond else \
        {"W": None, "a": None, "b": h.sum(0)}
    for name, grad in expected.items():
        if grad is None:
            assert params[name].grad is None, name
        else:
            np.testing.assert_allclose(params[name].grad.numpy(), grad, rtol=1e-6)


#: both branches hold a ``k`` (legal: neither sees the other's)
TWO_KS = _model('''
agraph (bool c, float[2] x) => (float[2] y, float[2] z) <float[2] s = {1.0, 2.0}> {
  z = Add(x, s)
  y = If(c) <then_branch = t () => (float[2] o) <float[2] k = {5.0, 7.0}> {
               m = Mul(x, k)
               o = Add(m, s)
             },
             else_branch = e () => (float[2] o2) <float[2] k = {-1.0, 3.0}> {
               o2 = Sub(x, k)
             }>
}''')


def test_branch_initializers_of_one_name_are_kept_apart():
    """Two parameters for the branches' ``k``s, the second named ``k@1``."""
    model = TWO_KS
    for cond in (True, False):
        module = _agrees(model, {"c": np.array(cond), "x": np.array([1.0, -2.0], np.float32)})
    assert {n: t.tolist() for n, t in module.onnx_tensors().items()} == {
        "s": [1.0, 2.0], "k": [5.0, 7.0], "k@1": [-1.0, 3.0]}


def test_trained_branch_initializers_are_written_back_into_their_subgraphs():
    """`spa recover` writes each trained value back under its initializer: a branch's ``k``
    into its own subgraph, ``k@1`` into the other's (written_back read the main graph's
    alone before, and trained branch values were lost)."""
    from spa.torch.recover import written_back

    model = TWO_KS
    module = st.from_onnx(model)
    with torch.no_grad():
        for i, p in enumerate(module.onnx_tensors().values()):
            p.add_(10.0 * (i + 1))  # s, k, k@1: +10, +20, +30
    trained = written_back(model, module)
    x = np.array([1.0, -2.0], np.float32)
    # then: x·k + s, k = [25, 27], s = [11, 12]; else: x − k@1, k@1 = [29, 33]
    for cond, want in ((True, [36.0, -42.0]), (False, [-28.0, -35.0])):
        got = val.run(val.session(trained), {"c": np.array(cond), "x": x})
        np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-6)


def test_branch_initializer_shadowing_an_outer_value_is_refused():
    """ONNX forbids it, and onnxruntime reads the branch's ``s`` here but the outer one once
    the other branch reads ``s`` too."""
    model = _model('''
agraph (bool c, float[2] x) => (float[2] y) <float[2] s = {1.0, 2.0}> {
  y = If(c) <then_branch = t () => (float[2] o) <float[2] s = {5.0, 7.0}> { o = Mul(x, s) },
             else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
}''')
    with pytest.raises(st.UnsupportedOpsError, match="subgraph t: its initializers s shadow"):
        st.from_onnx(model)


# ---- Loop -----------------------------------------------------------------------------------
LW = (RNG.standard_normal((2, 2)) * 0.8).astype(np.float32)


def _loop(trips: str, cond: str) -> onnx.ModelProto:
    """``v ← v·W + i`` (W outer), ``acc += v`` while ``Σ|acc| < limit`` (an outer value);
    scan outputs each ``v`` and ``i``."""
    return _model(f'''
agraph (int64 M, bool go, float limit, float[2] v0) => (float[2] v, float[2] acc,
                                                        float[N, 2] vs, float[N] its)
    <float[2, 2] W = {{{_floats(LW)}}}, float[2] zeros = {{0.0, 0.0}}> {{
  v, acc, vs, its = Loop({trips}, {cond}, v0, zeros) <body = body (int64 i, bool c, float[2] vi,
                                                         float[2] ai)
      => (bool c2, float[2] v2, float[2] a2, float[2] s, float fi) {{
    fi = Cast<to = 1>(i)
    w = MatMul(vi, W)
    v2 = Add(w, fi)
    a2 = Add(ai, v2)
    absolute = Abs(a2)
    total = ReduceSum<keepdims = 0>(absolute)
    c2 = Less(total, limit)
    s = Identity(v2)
  }}>
}}''')


@pytest.mark.parametrize(("trips", "cond", "m", "go", "limit", "steps"), [
    ("M", '""', 4, True, 1e6, 4),    # counted: M only
    ('""', "go", 0, True, 20.0, 6),  # conditional: the body's condition ends it
    ("M", "go", 2, True, 20.0, 2),   # both, M first
    ("M", "go", 9, True, 20.0, 6),   # both, the condition first
    ("M", "go", 3, False, 1e6, 0),   # never entered: empty scan outputs
    ("M", '""', 9, True, 20.0, 6),   # M only: onnxruntime still reads the body's condition
])
def test_loop_matches_onnxruntime(trips, cond, m, go, limit, steps):
    feeds = {"M": np.array(m, np.int64), "go": np.array(go), "limit": np.array(limit, np.float32),
             "v0": np.array([0.5, -1.0], np.float32)}
    model = _loop(trips, cond)
    if trips == '""':
        del feeds["M"]
        model.graph.input.remove(model.graph.input[0])
    module = _agrees(model, feeds)
    its = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])[3]
    assert its.tolist() == list(range(steps))


def test_loss_decreases_through_a_loop_on_an_outer_weight():
    model = _loop("M", '""')
    module = st.from_onnx(model)
    assert set(_parameters(module)) == {"W", "zeros"}
    args = (torch.tensor(3), torch.tensor(True), torch.tensor(1e6), torch.tensor([0.5, -1.0]))
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        vs = module(*args)[2]
        loss = torch.nn.functional.mse_loss(vs, target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.9 * losses[0]
    assert _parameters(module)["zeros"].grad is None  # the scan of v never reads acc: W moved


# ---- Scan -----------------------------------------------------------------------------------
SW = RNG.standard_normal(3).astype(np.float32)
SCAN = _model(f'''
agraph (float[3] s0, float[2, 4, 3] a, float[3, 4] b) => (float[3] s, float[3, 4] ys,
                                                         float[2, 3, 4] zs)
    <float[3] w = {{{_floats(SW)}}}> {{
  s, ys, zs = Scan(s0, a, b) <num_scan_inputs = 2, scan_input_axes = [1, -1],
                              scan_input_directions = [0, 1], scan_output_axes = [1, -1],
                              scan_output_directions = [1, 0],
    body = body (float[3] si, float[2, 3] at, float[3] bt) => (float[3] s2, float[3] y,
                                                               float[2, 3] z) {{
      prod = Mul(at, bt)
      rows = ReduceSum<keepdims = 0>(prod, zero)
      s2 = Add(si, rows)
      y = Mul(s2, w)
      z = Sub(at, bt)
  }}>
}}''')
SCAN.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"))


def test_scan_reverse_directions_and_axes_match_onnxruntime():
    feeds = {"s0": RNG.standard_normal(3).astype(np.float32),
             "a": RNG.standard_normal((2, 4, 3)).astype(np.float32),
             "b": RNG.standard_normal((3, 4)).astype(np.float32)}
    module = _agrees(SCAN, feeds)
    ys = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])[1]
    ys.sum().backward()
    w = _parameters(module)["w"]
    # ys[:, j] = s_t · w for the states s_1..s_4 (in reverse order): d/dw = Σ_t s_t
    states = feeds["s0"] + np.cumsum([(feeds["a"][:, t] * feeds["b"][:, 3 - t]).sum(0)
                                      for t in range(4)], axis=0)
    np.testing.assert_allclose(w.grad.numpy(), states.sum(0), rtol=1e-5)


# ---- nesting --------------------------------------------------------------------------------
NESTED = _model(f'''
agraph (int64 M, float[2] v0) => (float[2] v, float[N, 2] vs)
    <float[2, 2] W = {{{_floats(LW)}}}, int64 two = {{2}}, int64 nought = {{0}}> {{
  v, vs = Loop(M, "", v0) <body = body (int64 i, bool c, float[2] vi)
                                     => (bool c2, float[2] v2, float[2] s) {{
    c2 = Identity(c)
    r = Mod(i, two)
    even = Equal(r, nought)
    v2 = If(even) <then_branch = t () => (float[2] o) {{ o = MatMul(vi, W) }},
                   else_branch = e () => (float[2] o2) <float[2] cst = {{0.25, -0.5}}> {{
                     o2 = Add(vi, cst)
                   }}>
    s = Identity(v2)
  }}>
}}''')


def test_if_nested_in_a_loop_reads_values_two_scopes_out():
    feeds = {"M": np.array(5, np.int64), "v0": np.array([0.5, -1.0], np.float32)}
    module = _agrees(NESTED, feeds)
    params = _parameters(module)
    assert set(params) == {"W", "cst"}
    module(*[torch.from_numpy(feeds[n]) for n in module.input_names])[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_torchscript_export_with_a_loop_and_a_branch(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4) * 0.5)
            self.b = torch.nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            h = x
            for _ in range(int(n)):
                h = torch.tanh(h @ self.w + self.b)
            if h.sum() > 0:
                h = h * 2.0
            else:
                h = h - 1.0
            return h

    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(Net()), (torch.randn(2, 4), torch.tensor(3)), buffer,
                          dynamo=False, input_names=["x", "n"], opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    assert {"Loop", "If"} <= {n.op_type for n in model.graph.node}
    cond = next(n.input[0] for n in model.graph.node if n.op_type == "If")
    taken = set()
    for sign, n in ((1.0, 0), (-1.0, 0), (1.0, 3)):  # no step: the sign of x picks the branch
        x = (sign * np.abs(RNG.standard_normal((2, 4)))).astype(np.float32)
        module = _agrees(model, {"x": x, "n": np.array(n, np.int64)})
        _, mids = module(torch.from_numpy(x), torch.tensor(n), capture=[cond])
        taken.add(bool(mids[cond]))
    assert taken == {True, False}
    assert set(_parameters(module)) == {"w", "b"}


# ---- sequences and optionals ----------------------------------------------------------------
SEQUENCES = {
    "construct_at": '''agraph (float[2, 3] x) => (float[2, 3] y) {
        n = Neg(x)
        e = Exp(x)
        s = SequenceConstruct(x, n, e)
        last = SequenceAt(s, minus_one)
        first = SequenceAt(s, nought)
        y = Add(last, first)
    }''',
    "empty_insert_concat": '''agraph (float[2, 3] x) => (float[6, 3] y) {
        n = Neg(x)
        e = Exp(x)
        s0 = SequenceEmpty<dtype = 1>()
        s1 = SequenceInsert(s0, x)
        s2 = SequenceInsert(s1, n, nought)
        s3 = SequenceInsert(s2, e, minus_one)
        y = ConcatFromSequence<axis = 0>(s3)
    }''',
    "erase_length": '''agraph (float[2, 3] x) => (float[1, 2, 3] y, int64 count) {
        n = Neg(x)
        e = Exp(x)
        s = SequenceConstruct(x, n, e)
        s1 = SequenceErase(s, one)
        s2 = SequenceErase(s1)
        count = SequenceLength(s2)
        y = ConcatFromSequence<axis = 0, new_axis = 1>(s2)
    }''',
    "split_squeezed_stacked": '''agraph (float[2, 3] x) => (float[2, 3] y) {
        s = SplitToSequence<axis = 1, keepdims = 0>(x)
        y = ConcatFromSequence<axis = -1, new_axis = 1>(s)
    }''',
    "split_by_length": '''agraph (float[2, 3] x) => (float[2, 1] y, int64 count) {
        s = SplitToSequence<axis = -1>(x, two)
        count = SequenceLength(s)
        y = SequenceAt(s, minus_one)
    }''',
    "split_by_lengths": '''agraph (float[2, 3] x) => (float[1, 3] y) {
        s = SplitToSequence<axis = 0>(x, sizes)
        y = SequenceAt(s, nought)
    }''',
    "sequence_output": '''agraph (float[2, 3] x) => (seq(float[2, _]) y) {
        y = SplitToSequence<axis = 1>(x, two)
    }''',
    "map": '''agraph (float[2, 3] x) => (float[2, 3] y, float[2] sums) {
        s = SplitToSequence<axis = 0>(x)
        n = Neg(x)
        ns = SplitToSequence<axis = 0>(n)
        mapped, total = SequenceMap(s, ns, x) <body = b (float[1, 3] p, float[1, 3] q,
                                                          float[2, 3] r) => (float[1, 3] o,
                                                                             float t) {
            pq = Mul(p, q)
            o = Add(pq, one_f)
            rs = ReduceSum<keepdims = 0>(r)
            ps = ReduceSum<keepdims = 0>(p)
            t = Add(rs, ps)
        }>
        y = ConcatFromSequence<axis = 0>(mapped)
        sums = ConcatFromSequence<axis = 0, new_axis = 1>(total)
    }''',
    "built_in_a_loop": '''agraph (float[2, 3] x) => (float[6, 3] y) {
        s0 = SequenceEmpty<dtype = 1>()
        s = Loop(three, "", s0) <body = b (int64 i, bool c, seq(float[2, 3]) si)
                                         => (bool c2, seq(float[2, 3]) so) {
            c2 = Identity(c)
            f = Cast<to = 1>(i)
            xi = Mul(x, f)
            so = SequenceInsert(si, xi)
        }>
        y = ConcatFromSequence<axis = 0>(s)
    }''',
    "optional": '''agraph (float[2, 3] x) => (float[2, 3] y, bool has, bool none) {
        o = Optional(x)
        has = OptionalHasElement(o)
        y = OptionalGetElement(o)
        empty = Optional<type = float[2, 3]>()
        none = OptionalHasElement(empty)
    }''',
}
CONSTANTS = {"nought": np.array(0, np.int64), "one": np.array(1, np.int64),
             "minus_one": np.array(-1, np.int64), "two": np.array(2, np.int64),
             "three": np.array(3, np.int64), "sizes": np.array([1, 1], np.int64),
             "one_f": np.array(1.0, np.float32)}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_sequence_and_optional_ops_match_onnxruntime(name):
    model = _model(SEQUENCES[name])
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k)
                                   for k, v in CONSTANTS.items())
    _agrees(model, {"x": X})


# ---- refused up front -----------------------------------------------------------------------
def test_unsupported_ops_in_subgraphs_are_listed_up_front():
    model = _model('''
agraph (bool c, float[2] x) => (float[2] y) {
  u = my.ops.Outer(x)
  y = If(c) <then_branch = t () => (float[2] o) {
               o = Loop(three, "", u) <body = b (int64 i, bool k, float[2] v)
                                               => (bool k2, float[2] v2) {
                 k2 = Identity(k)
                 v2 = my.ops.Inner(v)
               }>
             },
             else_branch = e () => (float[2] o2) { o2 = my.ops.Inner(x) }>
}''')
    with pytest.raises(st.UnsupportedOpsError, match=r"Inner \(2×\), Outer \(1×\)"):
        st.from_onnx(model)


def test_scan_before_opset_9_is_refused_up_front():
    """Opset 8's Scan has a batch axis and sequence lengths: not run."""
    model = _model('''
agraph (float[1, 4, 3] xs) => (float[1, 4, 3] ys) {
  ys = Scan("", xs) <num_scan_inputs = 1, body = b (float[3] x) => (float[3] y) { y = Neg(x) }>
}''', '<ir_version: 4, opset_import: ["" : 8]>\n')
    with pytest.raises(st.UnsupportedOpsError, match=r"at opset 8: Scan \(1×\)"):
        st.from_onnx(model)


@pytest.mark.parametrize("use_cache", [False, True])
def test_optimum_merged_decoder_runs_both_branches(use_cache):
    """Optimum's merged decoder (one If on ``use_cache_branch``, a BART decoder step in each
    branch, the cached one reading the past keys and values) equals onnxruntime down either
    branch; from_onnx refused its If before."""
    from pathlib import Path

    path = Path(__file__).parent / "models" / "optimum_bart_merged" / "decoder_model_merged.onnx"
    model = onnx.load(str(path))
    feeds = val.random_inputs(val.session(model))
    feeds["use_cache_branch"] = np.array([use_cache])
    expected = val.run(val.session(model), feeds)
    module = st.from_onnx(model)
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    assert len(got) == len(expected) == 1 + 4 * 2  # logits, then 2 layers' self and cross k/v
    for g, e in zip(got, expected.values()):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)
