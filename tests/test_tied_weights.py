"""Tied weights are written once (spa/ir/tied.py).

The pattern HuggingFace's dynamo exports have: the embedding ``Gather(wte, ids)`` and the
``lm_head`` ``MatMul(h, Transpose(wte))`` read one tensor; layer-norm weights and zero biases
equal across layers are one deduplicated initializer. Normal form folds the Transpose into a
constant and copies the deduplicated vectors per reader; the written file must hold each of them
once again, pruned consistently, and the report must count the files' own parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Builder
from onnx import numpy_helper
from oracle import file_params, prune_checked

from spa.api import analyze

V, H, F = 200, 16, 24  # vocabulary, hidden size, MLP width


def tied_lm(opset: int = 18) -> onnx.ModelProto:
    """ids → Gather(wte) → 2 residual MLPs (their output biases one shared zero vector) →
    MatMul with Transpose(wte) → logits."""
    b = Builder(seed=3)
    wte = b.weight(V, H, name="wte")
    zeros = b.const(np.zeros(H, np.float32), name="zeros_h")
    x = b.op("Gather", wte, "ids", name="embed", axis=0)
    for i in range(2):
        up = b.op("Add", b.op("MatMul", x, b.weight(H, F, name=f"up{i}.w")), b.weight(F))
        down = b.op("MatMul", b.op("Relu", up), b.weight(F, H, name=f"down{i}.w"))
        x = b.op("Add", x, b.op("Add", down, zeros))
    head = b.op("Transpose", wte, name="lm_head_t", perm=[1, 0])
    b.op("MatMul", x, head, outputs=["logits"], name="lm_head")
    return b.model({"ids": ([1, 5], onnx.TensorProto.INT64)}, {"logits": [1, 5, V]},
                   opset=opset)


def duplicates_of(path: Path, name: str) -> list[str]:
    """Initializers other than ``name`` shaped like it or like its transpose (a copy, or one
    a weight update made differ)."""
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}
    return [n for n, s in shapes.items() if n != name and s in (shapes[name], shapes[name][::-1])]


def test_tie_is_seen() -> None:
    """The view is tied to wte, and its axes are coupled with wte's (one hidden group)."""
    analysis = analyze(tied_lm())
    ties = analysis.model.ties
    assert ties["lm_head_t_out0"].source == "wte"
    assert [s.op for s in ties["lm_head_t_out0"].steps] == ["Transpose"]
    assert all(t.source == "zeros_h" and t.is_copy and t.uniform
               for n, t in ties.items() if n.startswith("zeros_h__spa_copy"))
    (hidden,) = [{m.space for m in g.members} for g in analysis.prunable_groups
                 if ("wte", 1) in {m.space for m in g.members}]
    assert {("lm_head_t_out0", 0), ("up0.w", 0), ("down1.w", 1)} <= hidden


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_tied_weight_written_once(tmp_path: Path, ratio: float) -> None:
    """Pruned under the masked oracle (no norm: the hidden size is a group like any other): the
    written file holds wte once, sliced for both readers, and no more parameters than the
    input."""
    out = prune_checked(tied_lm(), tmp_path, ratio=ratio)
    assert duplicates_of(out.path, "wte") == []
    written = onnx.load(str(out.path)).graph
    assert sum(t.name.startswith("zeros_h") for t in written.initializer) == 1
    transposes = [n for n in written.node if n.op_type == "Transpose"]
    assert [list(n.input) for n in transposes] == [["wte"]]
    assert numpy_helper.to_array(next(t for t in written.initializer if t.name == "wte")).shape \
        == (V, H - int(ratio * H))
    assert file_params(out.path) <= file_params(tmp_path / "model.onnx")
    assert out.report.params_before == file_params(tmp_path / "model.onnx") \
        == V * H + 2 * (H * F + F + F * H) + H


def test_unpruned_model_keeps_its_tensors(tmp_path: Path) -> None:
    """Nothing pruned: the written file holds exactly the input's initializers."""
    out = prune_checked(tied_lm(), tmp_path, ratio=0.0, expect_pruned=False)
    names = {t.name for t in onnx.load(str(out.path)).graph.initializer}
    assert names == {t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}


def test_compensation_leaves_the_tie(tmp_path: Path) -> None:
    """OBSPA's weight update would untie lm_head from wte: the tied weight gets none, and the
    file still holds wte once, as predicted."""
    from spa.api import CheckOptions, PruneOptions, prune

    src = tmp_path / "model.onnx"
    onnx.save(tied_lm(), str(src))
    report, _ = prune(src, tmp_path / "o.onnx",
                      PruneOptions(ratio=0.5, criterion="obspa", samples=4),
                      CheckOptions(latency=False))
    assert report.compensated_layers > 0
    assert duplicates_of(tmp_path / "o.onnx", "wte") == []
    assert file_params(tmp_path / "o.onnx") < file_params(src)
    assert report.params_after == report.predicted_params_after == file_params(tmp_path / "o.onnx")


def test_huggingface_gpt2_lm_head(tmp_path: Path) -> None:
    """HF GPT-2 with its tied lm_head, exported by dynamo: the pruned file holds the embedding
    once and fewer parameters than the input, counted from the files."""
    pytest.importorskip("transformers")
    from models.export import export_module
    from models.thirdparty import HF_MODELS

    module, inputs = HF_MODELS["hf_gpt2_lm"]()
    src = export_module(module, inputs, tmp_path / "gpt2.onnx", exporter="dynamo")
    out = prune_checked(src, tmp_path, ratio=0.5)
    (wte,) = [t.name for t in onnx.load(str(src)).graph.initializer if list(t.dims) == [1000, 64]]
    assert duplicates_of(out.path, wte) == []
    assert out.report.params_after == file_params(out.path) < file_params(src)


def test_tied_weight_written_once_with_external_data(tmp_path: Path) -> None:
    """A model with external data is written tensor by tensor: wte goes to the data file once."""
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(tied_lm(), str(src), save_as_external_data=True, size_threshold=0)
    out = prune_checked(src, tmp_path, ratio=0.5)
    assert duplicates_of(out.path, "wte") == []
    assert out.path.with_name(out.path.name + ".data").exists()


def test_reshaped_view_follows_its_source(tmp_path: Path) -> None:
    """``W [O, I]`` read by a MatMul and, reshaped to ``[O, I, 1, 1]``, by a 1x1 Conv: the O
    channels the conv produces and the MatMul consumes are one group; the written Reshape
    targets the pruned shape."""
    b = Builder(seed=1)
    w = b.weight(12, 6, name="w")
    y = b.op("Conv", "x", b.op("Reshape", w, b.const([12, 6, 1, 1]), name="as_conv"))
    pooled = b.op("Flatten", b.op("GlobalAveragePool", b.op("Relu", y)))
    b.op("MatMul", pooled, w, outputs=["y"])
    model = b.model({"x": [1, 6, 4, 4]}, {"y": [1, 6]})
    out = prune_checked(model, tmp_path, ratio=0.5)
    written = onnx.load(str(out.path)).graph
    assert {t.name: tuple(t.dims) for t in written.initializer if t.name.startswith("w")} \
        == {"w": (6, 6)}
    (reshape,) = [n for n in written.node if n.op_type == "Reshape"]
    target = next(t for t in written.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [6, 6, 1, 1]


def test_view_through_several_layout_ops_freezes(tmp_path: Path) -> None:
    """``Transpose(Transpose(W))`` beside ``W`` itself: the view's middle shape could not be
    rewritten, so W's live axes freeze, with the reason; the file still holds W once."""
    b = Builder(seed=2)
    w = b.weight(6, 8, name="w")
    h = b.op("Relu", b.op("MatMul", "x", w))
    twice = b.op("Transpose", b.op("Transpose", w, perm=[1, 0]), perm=[1, 0], name="back")
    mid = b.op("Relu", b.op("MatMul", h, b.weight(8, 10)))  # 10 channels free to go
    b.op("MatMul", b.op("MatMul", mid, b.weight(10, 6)), twice, outputs=["y"])
    model = b.model({"x": [1, 6]}, {"y": [1, 8]})
    analysis = analyze(model)
    frozen = [r for g in analysis.groups if ("w", 1) in {m.space for m in g.members}
              for r in g.frozen]
    assert any("through several layout ops (Transpose, Transpose)" in r for r in frozen)
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    from spa.api import CheckOptions, PruneOptions, prune

    report, _ = prune(src, tmp_path / "o.onnx", PruneOptions(ratio=0.5),
                      CheckOptions(latency=False))
    assert duplicates_of(tmp_path / "o.onnx", "w") == []
    assert report.params_after == file_params(tmp_path / "o.onnx") < file_params(src)


@pytest.mark.parametrize("shared_weight", [False, True])
def test_copies_of_a_vector_join_where_they_agree(tmp_path: Path, shared_weight: bool) -> None:
    """Two convs read one bias vector (of distinct values): normal form gives each its own copy.
    Their channels are two groups unless they share the weight too: then the copies are sliced
    alike and written as one tensor again; otherwise each keeps its own entries. Either way
    the prediction counts what is written."""
    b = Builder(seed=4)
    bias = b.weight(8, name="b")
    w1 = b.weight(8, 3, 3, 3, name="w1")
    w2 = w1 if shared_weight else b.weight(8, 3, 3, 3, name="w2")
    ys = [b.op("Relu", b.op("Conv", "x", w, bias, pads=[1] * 4)) for w in (w1, w2)]
    y = b.conv(b.op("Concat", *ys, axis=1), 16, 4, name="c3")
    model = b.model({"x": [1, 3, 6, 6]}, {y: [1, 4, 6, 6]})
    # Exact counts: with a shared weight each of the 8 channels is 2 of c3's inputs, and the
    # default keeps c3's input in whole kernel blocks of 16 (all 8).
    out = prune_checked(model, tmp_path, ratio=0.5, round_to=1)
    biases = {t.name: tuple(t.dims) for t in onnx.load(str(out.path)).graph.initializer
              if t.name.startswith("b")}
    assert biases == ({"b": (4,)} if shared_weight else {"b": (4,), "b__spa_copy1": (4,)})
