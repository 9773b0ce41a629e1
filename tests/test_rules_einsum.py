"""Op rule for Einsum (spa/coupling/rules/einsum.py): dense layers written as einsums, attention
scores and context, per-group weights, and the forms it refuses, each with its reason.

Every prunable graph is pruned under the masked-original oracle (``prune_checked``) and read
back: which weight slices survive, and that producer rows and consumer columns are the same
channels.
"""

from __future__ import annotations

import numpy as np
import pytest
from attn_graphs import (
    HD,
    RANKING,
    SCALE,
    X3,
    D,
    H,
    S,
    assert_heads_kept,
    damp_heads,
    heads_group,
    merge_heads,
    residual_norm,
    weight,
)
from graphs import Builder, group_of, init_shapes, init_value, kept_slices
from oracle import prune_checked
from reasons import frozen_text, rule_reason

from spa.coupling.rules.einsum import Equation, macs, parse


def einsum_dense(b: Builder, x: str, equation: str, sizes: dict[str, int], name: str) -> str:
    """``einsum(equation, x, W)`` (or ``(W, x)`` when the weight's term comes first) with a
    random weight ``<name>.w`` shaped by its term's letters."""
    eq = parse(equation, 2)
    assert isinstance(eq, Equation)
    w_at = 0 if eq.terms[0] in ("jk", "kj") else 1
    w = b.weight(*(sizes[c] for c in eq.terms[w_at]), name=f"{name}.w")
    ins = (w, x) if w_at == 0 else (x, w)
    return b.op("Einsum", *ins, equation=equation, name=name)


# --- dense layers -------------------------------------------------------------------------------
MLP_FORMS = {  # equation → input shape (the hidden axis is j in, k out)
    "bij,jk->bik": [2, 3, 8],
    "ij,jk->ik": [4, 8],
    "bij,kj->bik": [2, 3, 8],  # weight stored [out, in], as Gemm with transB
    "ij,jk": [4, 8],  # implicit output: the letters seen once, alphabetically (ik)
    "jk,bij->bik": [2, 3, 8],  # weight first
}


@pytest.mark.parametrize("equation", list(MLP_FORMS))
def test_two_layer_mlp_prunes_its_hidden_units(tmp_path, equation):
    shape = MLP_FORMS[equation]
    b = Builder()
    h = b.op("Relu", einsum_dense(b, "x", equation, {"j": 8, "k": 16}, "fc1"))
    y = einsum_dense(b, h, equation, {"j": 16, "k": 4}, "fc2")
    m = b.model({"x": shape}, {y: shape[:-1] + [4]})
    out_axis = 0 if equation == "bij,kj->bik" else 1  # the weight's k axis
    g = group_of(m, "fc1.w", out_axis)
    assert g.prunable and g.size == 16
    assert group_of(m, "fc2.w", 1 - out_axis).id == g.id
    assert not group_of(m, "fc2.w", out_axis).prunable  # reaches the graph output
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = kept_slices(init_value(m, "fc1.w"), init_value(out.path, "fc1.w"), out_axis)
    cols = kept_slices(init_value(m, "fc2.w"), init_value(out.path, "fc2.w"), 1 - out_axis)
    assert rows == cols and len(rows) == 8
    rows_in = int(np.prod(shape[:-1]))  # the MACs: one per (row, j, k) of each einsum
    assert out.report.flops_before == rows_in * (8 * 16 + 16 * 4)
    assert out.report.flops_after == rows_in * (8 * 8 + 8 * 4)


def test_einsum_between_convolutions(tmp_path):
    """``nchw,cd->ndhw`` (the fuzzer's form): a 1x1 conv written as an einsum; the conv before
    it and the einsum's own outputs both prune."""
    b = Builder()
    c = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    e = b.op("Relu", b.op("Einsum", c, b.weight(8, 6, name="e.w"), equation="nchw,cd->ndhw",
                          name="e"))
    y = b.conv(e, 6, 4, name="c2")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_of(m, "c1.w", 0).id == group_of(m, "e.w", 0).id
    assert group_of(m, "e.w", 1).id == group_of(m, "c2.w", 1).id
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["e.w"] == (4, 3)
    assert init_shapes(out.path)["c2.w"] == (4, 3, 3, 3)


def test_per_group_weight_shares_its_group_axis(tmp_path):
    """``bgi,gio->bgo``: g is carried by the activation and the weight into the output (a
    per-channel parameter of the weight; here it comes from the graph input and keeps its
    length), i is consumed and o produced, in every group alike."""
    b = Builder()
    h = b.op("Relu", b.op("Einsum", "x", b.weight(2, 8, 6, name="g1.w"),
                          equation="bgi,gio->bgo", name="g1"))
    y = b.op("Einsum", h, b.weight(2, 6, 3, name="g2.w"), equation="bgo,goj->bgj", name="g2")
    m = b.model({"x": [5, 2, 8]}, {y: [5, 2, 3]})
    g = group_of(m, "g1.w", 2)
    assert g.prunable and g.size == 6 and group_of(m, "g2.w", 1).id == g.id
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path) == {"g1.w": (2, 8, 3), "g2.w": (2, 3, 3)}


def test_weight_axis_summed_alone_keeps_its_length(tmp_path):
    """``bi,ijl->bj``: l is summed within the weight alone (no channel of anything); i is still
    consumed and j produced."""
    b = Builder()
    h = b.op("Relu", b.gemm("x", 6, 8, name="fc"))
    e = b.op("Relu", b.op("Einsum", h, b.weight(8, 10, 3, name="e.w"), equation="bi,ijl->bj",
                          name="e"))
    y = b.gemm(e, 10, 2, name="head")
    m = b.model({"x": [2, 6]}, {y: [2, 2]})
    assert group_of(m, "fc.w", 0).id == group_of(m, "e.w", 0).id
    assert group_of(m, "e.w", 1).id == group_of(m, "head.w", 1).id
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["e.w"] == (4, 5, 3)


# --- attention ----------------------------------------------------------------------------------
ATTENTION_FORMS = {  # (scores, context) equations; "heads first": Q/K/V transposed to [B, H, S, d]
    "heads first": ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
    "sequence first": ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"),
}


def _einsum_attention(form: str) -> tuple:
    scores_eq, context_eq = ATTENTION_FORMS[form]
    heads_first = form == "heads first"
    b = Builder()

    def project(x: str, n: str) -> str:
        y = b.op("Einsum", x, weight(b, D, D, name=f"{n}.w"), equation="bsd,de->bse", name=n)
        return b.op("Add", y, weight(b, D, name=f"{n}.b"))

    def heads(t: str, n: str) -> str:
        r = b.op("Reshape", t, b.const([1, S, H, HD]), name=f"split_{n}")
        return b.op("Transpose", r, perm=[0, 2, 1, 3]) if heads_first else r

    q, k, v = (heads(project("x", n), n) for n in "qkv")
    scores = b.op("Einsum", q, k, equation=scores_eq, name="scores")
    p = b.op("Softmax", b.op("Mul", scores, b.const(np.float32(SCALE))), axis=-1)
    ctx = b.op("Einsum", p, v, equation=context_eq, name="context")
    merged = merge_heads(b, ctx) if heads_first \
        else b.op("Reshape", ctx, b.const([1, S, D]), name="merge")
    y = residual_norm(b, "x", project(merged, "o"))
    damp_heads(b, RANKING)
    return b.model(X3, {y: [1, S, D]})


@pytest.mark.parametrize("form", list(ATTENTION_FORMS))
def test_attention_einsums_prune_whole_heads(tmp_path, form):
    m = _einsum_attention(form)
    g = heads_group(m)
    assert {("k.w", 1), ("v.w", 1), ("o.w", 0)} <= {mem.space for mem in g.members}
    assert "summed over between activations" in rule_reason(m, "scores")  # head_dim stays
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])


def test_contraction_between_activations_freezes_with_the_reason():
    b = Builder()
    a = b.op("MatMul", "x", b.weight(D, 8, name="fa.w"), name="fa")
    c = b.op("MatMul", "x", b.weight(D, 8, name="fc.w"), name="fc")
    y = b.op("Einsum", a, c, equation="bsd,btd->bst", name="sim")
    m = b.model(X3, {y: [1, S, S]})
    assert "Einsum node 'sim': index 'd' of equation 'bsd,btd->bst' is summed over between " \
        "activations, with no weight to remove a channel at" in frozen_text(m, "fa.w", 1)


def test_index_summed_within_one_operand_freezes_with_the_reason():
    b = Builder()
    a = b.op("MatMul", "x", b.weight(D, 8, name="fa.w"), name="fa")
    y = b.op("Einsum", a, equation="bsd->bs", name="total")
    m = b.model(X3, {y: [1, S]})
    assert "Einsum node 'total': index 'd' of equation 'bsd->bs' is summed over within input 0 " \
        "'fa_out0' alone" in frozen_text(m, "fa.w", 1)


# --- refused forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("equation, x_shape, w_shape, out, words", [
    ("...j,jk->...k", [1, S, D], [D, 4], [1, S, 4], "has an ellipsis (...)"),
    ("bjj,jk->bk", [1, D, D], [D, 4], [1, 4], "repeats an index within 'bjj' (a diagonal)"),
    ("bsJ,Jk", [1, S, D], [D, 4], [None] * 3, "has an implicit output with upper-case indices"),
], ids=["ellipsis", "diagonal", "implicit-upper-case"])
def test_refused_forms_say_why(equation, x_shape, w_shape, out, words):
    b = Builder()
    a = b.op("MatMul", "x", b.weight(x_shape[-1], x_shape[-1], name="fa.w"), name="fa")
    y = b.op("Einsum", a, b.weight(*w_shape), equation=equation, name="e")
    m = b.model({"x": x_shape}, {y: out})
    assert f"Einsum node 'e': equation '{equation}' {words}" in frozen_text(m, "fa.w", 1)


def test_only_constant_operands_are_refused():
    """A product larger than its factors stays computed (spa/ir/computed.py folds the others)."""
    b = Builder()
    w = b.op("Einsum", b.weight(D, 1), b.weight(1, 4), equation="ij,jk->ik", name="fold_me")
    y = b.op("MatMul", "x", w)
    m = b.model(X3, {y: [1, S, 4]})
    assert rule_reason(m, "fold_me") == "every operand is a constant"


@pytest.mark.parametrize("equation, n, words", [
    ("ij,jk->ik", 3, "has 2 terms for 3 operands"),
    ("i1,jk->ik", 2, "has characters other than index letters"),
    ("ij,jk->iq", 2, "has an output index repeated or not in any input"),
    ("ij,jk->ii", 2, "has an output index repeated or not in any input"),
])
def test_parse_names_the_equation(equation, n, words):
    assert parse(equation, n) == f"equation '{equation}' {words}"


def test_parse_reads_implicit_and_spaced_equations():
    assert parse("ij, jk", 2) == Equation("ij, jk", ("ij", "jk"), "ik")
    assert parse("bhqd,bhkd -> bhqk", 2).out == "bhqk"


@pytest.mark.parametrize("equation, shapes, want", [
    ("bij,jk->bik", [(2, 3, 8), (8, 16)], 2 * 3 * 8 * 16),  # = MatMul's M·K·N per batch
    ("bhqd,bhkd->bhqk", [(1, 4, 5, 4), (1, 4, 5, 4)], 4 * 5 * 4 * 5),
    ("bij,bjk->bik", [(1, 3, 8), (2, 8, 4)], 2 * 3 * 8 * 4),  # b broadcast from 1
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], 2 * 2 * 3 * 4 * 5),
])
def test_macs(equation, shapes, want):
    eq = parse(equation, len(shapes))
    assert macs(eq, shapes) == want
