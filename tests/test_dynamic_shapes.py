"""Symbolic batch, sequence and spatial dims, and run-time shape subgraphs
(``Shape → Gather → Concat → Reshape``), survive pruning: the pruned model is run at several
concrete sizes and equals the masked original at each (the oracle at several sizes), and differs
from the unpruned original (so the oracle compares something).

Tiny graphs pin each idiom; reference models exported with dynamic axes (TorchScript) and with
``dynamic_shapes`` (dynamo, slow) check the whole path.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from attn_graphs import HD, KV, D, H, linear, sdpa
from graphs import Builder, group_of, init_shapes
from oracle import RTOL, Pruned, assert_masked_at, prune_checked, run_model

from spa.api import CheckOptions, analyze, apply, plan
from spa.api import PruneOptions as Options

NHW = [{"N": 1, "H": 8, "W": 8}, {"N": 2, "H": 5, "W": 7}, {"N": 3, "H": 12, "W": 6}]
NS = [{"N": 1, "S": 3}, {"N": 2, "S": 9}, {"N": 3, "S": 16}]


def _check_sizes(src, out: Pruned, sizes: list[dict[str, int]]) -> list[float]:
    """The oracle at every size, and the pruned model not equal to the unpruned one."""
    diffs = assert_masked_at(src, out, sizes)
    assert all(d <= RTOL for d in diffs)
    before, after = run_model(src, dims=sizes[-1]), run_model(out.path, dims=sizes[-1])
    assert any(not np.allclose(before[k], after[k], rtol=1e-3) for k in before)
    return diffs


def _save(m: onnx.ModelProto, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    return path


def _dims_of(b: Builder, x: str, *axes: int) -> list[str]:
    """``[x.size(a)]`` as 1-element int64 tensors, read at run time (TorchScript's form)."""
    shape = b.op("Shape", x)
    return [b.op("Unsqueeze", b.op("Gather", shape, b.const(np.int64(a)), axis=0), b.const([0]))
            for a in axes]


# --- CNNs: symbolic batch and spatial dims ----------------------------------------------------
def test_cnn_with_symbolic_batch_and_spatial_dims(tmp_path):
    """Strided conv, residual, squeeze-and-excite, global pooling head: nothing in the graph
    fixes H or W, and every group prunes."""
    b = Builder()
    x = b.op("Relu", b.bn(b.conv("x", 3, 8, name="c1"), 8))
    x = b.op("Relu", b.conv(x, 8, 12, name="down", strides=[2, 2]))
    x = b.op("Add", x, b.conv(b.op("Relu", b.conv(x, 12, 6, name="r1")), 6, 12, name="r2"))
    s = b.op("Sigmoid", b.conv(b.op("Relu", b.conv(b.op("GlobalAveragePool", x), 12, 4, k=1,
                                                   name="se1")), 4, 12, k=1, name="se2"))
    y = b.gemm(b.op("Flatten", b.op("GlobalAveragePool", b.op("Mul", x, s))), 12, 5, name="fc")
    m = b.model({"x": ["N", 3, "H", "W"]}, {y: ["N", 5]})
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.5, dims=NHW[1])
    assert init_shapes(out.path)["fc.w"] == (5, 6)
    assert init_shapes(out.path)["r1.w"] == (3, 6, 3, 3)
    _check_sizes(src, out, NHW)


def test_run_time_view_with_symbolic_dims(tmp_path):
    """Spatial attention pooling: ``t = x.view(n, c, -1)`` with ``n, c`` read at run time,
    softmax over the positions, ``y = (t * softmax(t)).view(n, c, h, w)`` with ``h, w`` read
    from ``x`` at run time and ``c`` too — a static dim read at run time, which SPA folds to a
    literal and rewrites."""
    b = Builder()
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    n, c = _dims_of(b, x, 0, 1)
    t = b.op("Reshape", x, b.op("Concat", n, c, b.const([-1]), axis=0), name="flat")
    t = b.op("Mul", t, b.op("Softmax", t, axis=-1))
    n2, c2, h, w = _dims_of(b, x, 0, 1, 2, 3)
    y = b.op("Reshape", t, b.op("Concat", n2, c2, h, w, axis=0), name="unflat")
    y = b.gemm(b.op("Flatten", b.op("GlobalMaxPool", b.conv(y, 8, 4, name="c2"))), 4, 3,
               name="fc")
    m = b.model({"x": ["N", 3, "H", "W"]}, {y: ["N", 3]})
    assert group_of(m, "c1.w", 0).prunable
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.5, dims=NHW[0])
    assert init_shapes(out.path)["c2.w"] == (2, 4, 3, 3)
    _check_sizes(src, out, NHW)


def test_values_viewed_by_the_keys_shape(tmp_path):
    """GPT-2 (transformers 5) views its values by the key's shape: ``v.view(*k.shape[:-1], -1,
    d)``. ONNX shape inference cannot tell the ``-1``; K and V have the same symbolic dims
    (one Split made both), so the ``-1`` is the head count and V's heads prune with Q's."""
    b = Builder()
    q, k, v = b.op("Split", linear(b, "x", D, 3 * D, "qkv"), axis=2, outputs=3)
    n, s = _dims_of(b, k, 0, 1)
    target = b.op("Concat", n, s, b.const([-1, HD]), axis=0)
    q, k, v = (b.op("Transpose", b.op("Reshape", t, target), perm=[0, 2, 1, 3]) for t in (q, k, v))
    ctx = b.op("Transpose", sdpa(b, q, k, v), perm=[0, 2, 1, 3])
    y = linear(b, b.op("Reshape", ctx, b.op("Concat", n, s, b.const([-1]), axis=0)), D, D, "o")
    m = b.model({"x": ["N", "S", D]}, {y: ["N", "S", D]})
    g = group_of(m, "qkv.w", 1)
    assert g.prunable and g.size == H
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.0, heads_ratio=0.5, dims={"N": 2, "S": 5})
    assert init_shapes(out.path)["qkv.w"] == (D, 3 * D // 2)
    _check_sizes(src, out, NS)


@pytest.mark.parametrize("model", ["resnet_basic", "efficientnet", "densenet", "unet"])
def test_reference_cnn_with_dynamic_axes(tmp_path, model):
    """TorchScript export with symbolic batch, height and width: every group but the
    classifier's prunes, and the oracle holds at three image sizes."""
    import models
    from models.export import _quiet

    spec = models.get_spec(model)
    src = tmp_path / "model.onnx"
    with _quiet():
        torch.onnx.export(spec.build().eval(), spec.inputs(batch=2), str(src), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N"}})
    a = analyze(src)
    assert all(g.prunable for g in a.groups if g.producers
               and not any("graph output" in r for r in g.frozen))
    out = prune_checked(src, tmp_path, ratio=0.5, dims={"N": 2, "H": 32, "W": 32})
    _check_sizes(src, out, [{"N": 1, "H": 32, "W": 32}, {"N": 2, "H": 24, "W": 40},
                            {"N": 3, "H": 16, "W": 16}])


# --- transformers: symbolic batch and sequence ------------------------------------------------
def _heads_target(b: Builder, x: str, heads: int) -> str:
    """``Concat(x.size(0), x.size(1), [heads], [HD])``: the target of ``view(B, S, heads, d)``."""
    return b.op("Concat", *_dims_of(b, x, 0, 1), b.const([heads]), b.const([HD]), axis=0)


def _attention_layer(b: Builder, x: str, i: int, split: str, merge: str, *, kv: int = H) -> str:
    """``x + o(attention(x))`` with run-time view targets ``split``/``merge`` (shared with other
    layers, as dynamo writes them); ``kv < H``: grouped-query, K/V repeated by Expand."""
    def heads(t: str, target: str) -> str:
        return b.op("Transpose", b.op("Reshape", t, target), perm=[0, 2, 1, 3])

    q = heads(linear(b, x, D, D, f"q{i}"), split)
    kv_target = split if kv == H else _heads_target(b, x, kv)
    k, v = (heads(linear(b, x, D, kv * HD, f"{n}{i}"), kv_target) for n in "kv")
    if kv < H:  # HF repeat_kv: [B, kv, S, d] → [B, kv, H/kv, S, d] → [B, H, S, d]
        n, s = _dims_of(b, x, 0, 1)
        expand = b.op("Concat", n, b.const([kv, H // kv]), s, b.const([HD]), axis=0)
        back = b.op("Concat", n, b.const([H]), s, b.const([HD]), axis=0)
        k, v = (b.op("Reshape", b.op("Expand", b.op("Unsqueeze", t, b.const([2])), expand), back)
                for t in (k, v))
    ctx = b.op("Transpose", sdpa(b, q, k, v, prefix=f"l{i}_"), perm=[0, 2, 1, 3])
    return b.op("Add", x, linear(b, b.op("Reshape", ctx, merge), D, D, f"o{i}"))


def _two_layers(kv: int = H) -> onnx.ModelProto:
    b = Builder()
    split = _heads_target(b, "x", H)
    merge = b.op("Concat", *_dims_of(b, "x", 0, 1), b.const([D]), axis=0)
    y = _attention_layer(b, _attention_layer(b, "x", 1, split, merge, kv=kv), 2, split, merge,
                         kv=kv)
    return b.model({"x": ["N", "S", D]}, {y: ["N", "S", D]})


def test_shared_run_time_head_targets_prune_per_layer(tmp_path):
    """One ``view(B, S, H, d)`` target feeds the Q/K/V splits of both layers (dynamo builds it
    once). The layers' heads are separate groups, and a plan that keeps 3 heads in one layer and
    1 in the other gives each view its own target."""
    m = _two_layers()
    a = analyze(m)
    heads = {n: group_of(m, f"q{n}.w", 1) for n in (1, 2)}
    assert all(g.prunable and g.size == H for g in heads.values())
    base = plan(a, Options(ratio=0.5, criterion="l1"))
    keep = {heads[1].id: (0, 1, 3), heads[2].id: (2,)}
    custom = dataclasses.replace(base, groups=tuple(
        dataclasses.replace(g, keep=keep.get(g.id, g.keep)) for g in base.groups))
    src = _save(m, tmp_path)
    report = apply(src, custom, tmp_path / "pruned.onnx",
                   CheckOptions(check_masked=True, rtol=RTOL, latency=False,
                                input_dims=(("N", 2), ("S", 5))))
    assert report.masked_relative_diff <= RTOL
    shapes = init_shapes(tmp_path / "pruned.onnx")
    assert shapes["q1.w"] == (D, 3 * HD) and shapes["q2.w"] == (D, HD)
    _check_sizes(src, Pruned(report, custom, tmp_path / "pruned.onnx"), NS)


@pytest.mark.parametrize("kv", [KV, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_with_symbolic_sequence(tmp_path, kv):
    """``[B, kv, H/kv, S, d] → [B, H, S, d]`` with symbolic ``B`` and ``S``: the run between
    them regroups (the same symbols on both sides), so a KV head and its query heads prune
    together. With one KV head (Falcon's multi-query attention) the expanded axis holds copies
    of one value, so the query heads go freely, the Expand's and the Reshape's literal ``H``
    rewritten, and the KV head stays."""
    m = _two_layers(kv=kv)
    for n in (1, 2):
        g = group_of(m, f"k{n}.w" if kv > 1 else f"q{n}.w", 1)
        assert g.prunable and g.size == (kv if kv > 1 else H)
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, heads_ratio=0.5, dims={"N": 2, "S": 5})
    shapes = init_shapes(out.path)
    assert shapes["q1.w"] == (D, D // 2) and shapes["k1.w"] == (D, HD)
    _check_sizes(src, out, NS)


def test_static_dim_read_at_run_time_is_rewritten(tmp_path):
    """``B, S, C = x.shape; ctx.reshape(B, S, C)``: with symbolic B and S the merge target reads
    C from ``x`` at run time. C is static (16), so SPA folds it to a literal and writes the
    pruned width there; without that the heads would freeze."""
    b = Builder()
    q, k, v = (b.op("Transpose", b.op("Reshape", linear(b, "x", D, D, n), _heads_target(b, "x", H)),
                    perm=[0, 2, 1, 3]) for n in "qkv")
    ctx = b.op("Transpose", sdpa(b, q, k, v), perm=[0, 2, 1, 3])
    merge = b.op("Concat", *_dims_of(b, "x", 0, 1, 2), axis=0)
    y = linear(b, b.op("Reshape", ctx, merge, name="merge"), D, D, "o")
    m = b.model({"x": ["N", "S", D]}, {y: ["N", "S", D]})
    assert group_of(m, "q.w", 1).prunable
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.5, dims={"N": 2, "S": 5})
    assert init_shapes(out.path)["o.w"] == (D // 2, D)
    _check_sizes(src, out, NS)


def _merge_by_another_tensor(mask_batch: str) -> onnx.ModelProto:
    """Attention whose scores add a mask ``[mask_batch, 1, S, S]`` and whose heads merge by the
    *input's* leading dims, ``reshape(*x.shape[:-1], -1)`` (Llama's TorchScript form). With a
    mask batch named apart from the input's, ONNX inference loses the batch through the
    broadcast: the merge gives ``[N, S, ?]``."""
    b = Builder()
    split = _heads_target(b, "x", H)
    q, k, v = (b.op("Transpose", b.op("Reshape", linear(b, "x", D, D, n), split),
                    perm=[0, 2, 1, 3]) for n in "qkv")
    ctx = b.op("Transpose", sdpa(b, q, k, v, mask="mask"), perm=[0, 2, 1, 3])
    merge = b.op("Concat", *_dims_of(b, "x", 0, 1), b.const([-1]), axis=0)
    y = linear(b, b.op("Reshape", ctx, merge, name="merge"), D, D, "o")
    return b.model({"x": ["N", "S", D], "mask": [mask_batch, 1, "S", "S"]}, {y: ["N", "S", D]})


def test_merge_dim_fixed_by_the_product_after_it(tmp_path):
    """The output projection's weight ``[D, D]`` says the merged dim is ``D`` (a MatMul runs
    only when its contracted dims are equal): ``heads × head_dim`` merges into it and the heads
    prune, at every batch the mask broadcasts to."""
    m = _merge_by_another_tensor("B")
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    merged = next(vi for vi in inferred.graph.value_info if vi.name == "merge_out0")
    assert merged.type.tensor_type.shape.dim[2].dim_value == 0  # ONNX alone: unknown
    assert group_of(m, "q.w", 1).prunable
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.5, dims={"N": 2, "S": 5, "B": 2})
    assert init_shapes(out.path)["o.w"] == (D // 2, D)
    _check_sizes(src, out, [{**d, "B": d["N"]} for d in NS] + [{"N": 3, "S": 4, "B": 1}])


def test_products_that_disagree_fix_no_dim(tmp_path):
    """Two products contracting the same unknown dim against 16 and 8: no run could satisfy
    both, so the dim stays unknown and the heads freeze (fail closed)."""
    m = _merge_by_another_tensor("B")
    extra = onnx.helper.make_node("MatMul", ["merge_out0", "w8"], ["y8"], name="other")
    m.graph.node.append(extra)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((D // 2, 3), np.float32),
                                                            "w8"))
    m.graph.output.append(onnx.helper.make_tensor_value_info("y8", onnx.TensorProto.FLOAT, None))
    group = group_of(m, "q.w", 1)
    assert not group.prunable and any("cannot tell which dims" in r for r in group.frozen)


def test_a_graph_input_keeps_its_symbolic_contracted_dim(tmp_path):
    """``x [N, K] @ W [16, 8]`` says K is 16 in every run, but ``x`` is the model's signature:
    its declared ``K`` is kept, in the analysis and in the written model."""
    b = Builder()
    y = b.op("Relu", linear(b, "x", D, 8, "fc1"))
    y = linear(b, y, 8, 3, "fc2")
    m = b.model({"x": ["N", "K"]}, {y: ["N", 3]})
    out = prune_checked(_save(m, tmp_path), tmp_path, ratio=0.5, dims={"N": 2, "K": D})
    dims = onnx.load(str(out.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", "K"]
    assert init_shapes(out.path)["fc1.w"] == (D, 4)


def test_heads_behind_a_mask_cut_at_run_time(tmp_path):
    """A causal mask ``[N, 1, M, M]`` cut to the keys' length, ``mask[..., :S]`` with ``S``
    read at run time (🤗 Optimum's Falcon): ONNX inference leaves every dim of the cut unknown,
    the scores it is added to lose their batch, and the context's view by the input's dims,
    ``view(N, H, S, d)``, could not be read. The cut keeps the mask's dims on the axes it does
    not slice (spa/ir/load.py), so the scores keep ``N`` and the heads prune."""
    b = Builder()
    split = _heads_target(b, "x", H)
    q, k, v = (b.op("Transpose", b.op("Reshape", linear(b, "x", D, D, n), split),
                    perm=[0, 2, 1, 3]) for n in "qkv")
    s = _dims_of(b, "x", 1)[0]
    mask = b.op("Slice", "mask", b.const([0]), s, b.const([3]), name="cut")
    context = sdpa(b, q, k, v, mask=mask)
    n, s = _dims_of(b, "x", 0, 1)
    context = b.op("Reshape", context, b.op("Concat", n, b.const([H]), s, b.const([HD]), axis=0))
    merge = b.op("Concat", *_dims_of(b, "x", 0, 1), b.const([D]), axis=0)
    y = linear(b, b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), merge), D, D,
               "o")
    m = b.model({"x": ["N", "S", D], "mask": ["N", 1, "S", "M"]}, {y: ["N", "S", D]})
    assert group_of(m, "q.w", 1).prunable
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.5, dims={"N": 2, "S": 5, "M": 7})
    assert init_shapes(out.path)["o.w"] == (D // 2, D)
    _check_sizes(src, out, [{**d, "M": d["S"] + 2} for d in NS])


def test_expand_keeping_dims_by_minus_one(tmp_path):
    """``g.expand(-1, S, -1)``: TorchScript writes the target as ``Where(Equal(t, -1), 1, t)``
    with ``t = [-1, S, -1]``, each ``-1`` ("keep this dim") replaced by 1. SPA reads it so, and
    the gate's channels, kept by the Expand, prune with the layer they scale."""
    b = Builder()
    h = b.op("Relu", linear(b, "x", D, 8, "fc1"))
    gate = b.op("Sigmoid", linear(b, b.op("ReduceMean", "x", axes=[1], keepdims=1), D, 8,
                                  "g"))
    minus = b.const([-1])
    target = b.op("Concat", minus, *_dims_of(b, "x", 1), minus, axis=0)
    keep = b.op("Where", b.op("Equal", target, b.const([-1, -1, -1])),
                b.const([1, 1, 1]), target)
    y = linear(b, b.op("Mul", h, b.op("Expand", gate, keep, name="expand")), 8, 3, "fc2")
    m = b.model({"x": ["N", "S", D]}, {y: ["N", "S", 3]})
    g = group_of(m, "fc1.w", 1)
    assert g.prunable and any(mem.space == ("g.w", 1) for mem in g.members)
    src = _save(m, tmp_path)
    out = prune_checked(src, tmp_path, ratio=0.5, dims={"N": 2, "S": 5})
    assert init_shapes(out.path)["g.w"] == (D, 4)
    _check_sizes(src, out, NS)


def _export_transformer(name: str, path, exporter: str) -> None:
    import models
    from models.export import _quiet

    spec = models.get_spec(name)
    names = list(spec.input_names)
    module, inputs = spec.build().eval(), spec.inputs(batch=2)
    out_axes = {0: "N"} if name.startswith("bert") else {0: "N", 1: "S"}
    with _quiet():
        if exporter == "torchscript":
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17,
                              input_names=names, output_names=["y"],
                              dynamic_axes={**dict.fromkeys(names, {0: "N", 1: "S"}),
                                            "y": out_axes})
        else:
            from torch.export import Dim

            dims = {0: Dim("N", min=1, max=8), 1: Dim("S", min=2, max=16)}
            inputs = tuple(t[:, :10] for t in inputs)  # not 1, not the table size 16
            program = torch.onnx.export(module, inputs, dynamo=True, input_names=names,
                                        output_names=["y"], dynamic_shapes=(dims,) * len(names),
                                        verbose=False)
            program.save(str(path), external_data=False)


def _prune_transformer(tmp_path, name: str, exporter: str) -> Pruned:
    src = tmp_path / "model.onnx"
    _export_transformer(name, src, exporter)
    a = analyze(src)
    heads = [g for g in a.groups if g.kind.value == "heads"]
    assert heads and all(g.prunable for g in heads), [g.frozen for g in heads]
    out = prune_checked(src, tmp_path, heads_ratio=0.5, mlp_ratio=0.5, dims={"N": 2, "S": 7})
    _check_sizes(src, out, NS)
    return out


def test_bert_with_dynamic_batch_and_sequence(tmp_path):
    """BERT exported by TorchScript with dynamic batch and sequence: heads and MLP prune."""
    _prune_transformer(tmp_path, "bert", "torchscript")


def test_gpt_torchscript_with_dynamic_sequence(tmp_path):
    """TorchScript writes repeat_kv's expand target as ``Where(Equal(shape, -1), 1, shape)``,
    which ONNX inference cannot read: it names the expanded dims afresh, and the Reshape after
    the Expand could not tell that ``kv × n_rep`` merges between the same batch and sequence.
    SPA names them from the target (spa/ir/load.py): the GQA heads prune."""
    _prune_transformer(tmp_path, "gpt", "torchscript")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_transformer_dynamo_dynamic_shapes(tmp_path, name):
    """Dynamo with ``dynamic_shapes`` builds each ``view`` target once for all layers and keeps
    batch and sequence symbolic everywhere: heads (GQA for gpt) and MLP prune."""
    _prune_transformer(tmp_path, name, "dynamo")
