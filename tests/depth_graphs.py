"""Tiny residual nets for the depth-pruning tests, built with :class:`Builder`.

:func:`prenorm_transformer`: ``x [1, S, D]`` → ``layers`` pre-norm layers, each an attention
sub-block ``x + o(attn(LN(x)))`` and an MLP sub-block ``x + down(relu(up(LN(x))))`` (four
residual blocks per two layers) → final LayerNorm. :func:`residual_cnn`: a stem, identity-shortcut
blocks ``relu(x + bn(conv(relu(conv(x)))))`` and one downsampling block with a projection
shortcut. ``scale`` multiplies the named blocks' last weights (tiny or large branches).
"""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder

S, D, H, HD, FF = 5, 16, 4, 4, 32


def _w(b: Builder, *shape: int, name: str, scale: float = 0.3) -> str:
    return b.const((b.rng.standard_normal(shape) * scale).astype(np.float32), name)


def _linear(b: Builder, x: str, n_in: int, n_out: int, name: str, scale: float = 0.3) -> str:
    y = b.op("MatMul", x, _w(b, n_in, n_out, name=f"{name}.w", scale=scale), name=name)
    return b.op("Add", y, _w(b, n_out, name=f"{name}.b", scale=scale), name=f"{name}.bias")


def _ln(b: Builder, x: str, name: str) -> str:
    scale = b.const(np.ones(D, np.float32) + 0.1 * b.rng.standard_normal(D).astype(np.float32),
                    f"{name}.scale")
    return b.op("LayerNormalization", x, scale, _w(b, D, name=f"{name}.bias"), name=name,
                axis=-1)


def _heads(b: Builder, x: str, name: str) -> str:
    r = b.op("Reshape", x, b.const([1, S, H, HD], f"{name}.shape"), name=f"{name}.split")
    return b.op("Transpose", r, perm=[0, 2, 1, 3], name=f"{name}.t")


def attention(b: Builder, x: str, p: str, scale: float = 1.0) -> str:
    h = _ln(b, x, f"{p}.ln1")
    q, k, v = (_heads(b, _linear(b, h, D, D, f"{p}.{n}"), f"{p}.{n}") for n in "qkv")
    kt = b.op("Transpose", k, perm=[0, 1, 3, 2], name=f"{p}.kt")
    s = b.op("Mul", b.op("MatMul", q, kt, name=f"{p}.scores"),
             b.const(np.float32(0.5), f"{p}.scale"), name=f"{p}.scale_mul")
    ctx = b.op("MatMul", b.op("Softmax", s, name=f"{p}.softmax", axis=-1), v, name=f"{p}.ctx")
    t = b.op("Transpose", ctx, perm=[0, 2, 1, 3], name=f"{p}.merge_t")
    m = b.op("Reshape", t, b.const([1, S, D], f"{p}.merge.shape"), name=f"{p}.merge")
    return b.op("Add", x, _linear(b, m, D, D, f"{p}.o", 0.3 * scale), name=f"{p}.res1")


def mlp(b: Builder, x: str, p: str, scale: float = 1.0) -> str:
    h = b.op("Relu", _linear(b, _ln(b, x, f"{p}.ln2"), D, FF, f"{p}.up"), name=f"{p}.relu")
    return b.op("Add", x, _linear(b, h, FF, D, f"{p}.down", 0.3 * scale), name=f"{p}.res2")


def prenorm_transformer(layers: int = 2, scales: dict[str, float] | None = None, seed: int = 0,
                        final_norm: bool = True):
    """The model; ``scales``: branch scale by residual Add name (``l0.res1``, ``l1.res2``…);
    without ``final_norm`` the last residual Add writes the graph output."""
    scales = scales or {}
    b = Builder(seed)
    x = "x"
    for i in range(layers):
        x = attention(b, x, f"l{i}", scales.get(f"l{i}.res1", 1.0))
        x = mlp(b, x, f"l{i}", scales.get(f"l{i}.res2", 1.0))
    if not final_norm:
        return b.model({"x": [1, S, D]}, {x: [1, S, D]})
    b.op("LayerNormalization", x, b.const(np.ones(D, np.float32), "lnf.scale"),
         b.const(np.zeros(D, np.float32), "lnf.bias"), name="lnf", axis=-1, outputs=["y"])
    return b.model({"x": [1, S, D]}, {"y": [1, S, D]})


def _basic(b: Builder, x: str, c: int, p: str, scale: float = 1.0) -> str:
    h = b.op("Relu", b.bn(b.conv(x, c, c, name=f"{p}.conv1"), c, name=f"{p}.bn1"))
    y = b.bn(b.conv(h, c, c, name=f"{p}.conv2"), c, name=f"{p}.bn2")
    b.inits[f"{p}.bn2.scale"] *= np.float32(0.3 * scale)
    b.inits[f"{p}.bn2.bias"] *= np.float32(0.3 * scale)
    return b.op("Relu", b.op("Add", x, y, name=f"{p}.add"), name=f"{p}.out")


def residual_cnn(scales: dict[str, float] | None = None, seed: int = 0):
    """``x [1, 3, 8, 8]`` → stem (8) → blocks b0, b1 (identity) → down (8→16, stride 2,
    projection shortcut) → block b2 (identity) → GlobalAveragePool → Flatten → Gemm (10)."""
    scales = scales or {}
    b = Builder(seed)
    x = b.op("Relu", b.conv("x", 3, 8, name="stem"), name="stem.relu")
    for p in ("b0", "b1"):
        x = _basic(b, x, 8, p, scales.get(p, 1.0))
    h = b.op("Relu", b.conv(x, 8, 16, name="down.conv1", strides=[2, 2]), name="down.relu")
    y = b.conv(h, 16, 16, name="down.conv2")
    short = b.conv(x, 8, 16, k=1, name="down.proj", strides=[2, 2])
    x = b.op("Relu", b.op("Add", short, y, name="down.add"), name="down.out")
    x = _basic(b, x, 16, "b2", scales.get("b2", 1.0))
    f = b.op("Flatten", b.op("GlobalAveragePool", x, name="gap"), name="flat")
    b.gemm(f, 16, 10, name="fc")
    model = b.model({"x": [1, 3, 8, 8]}, {"fc_out0": [1, 10]})
    return model


P = 3  # cached positions of the KV-cache decoder


def kv_decoder(seed: int = 0):
    """One pre-norm layer with a KV cache: ``x [1, S, D]``, ``past [1, P, D]`` → attention
    sub-block whose keys (and values) are ``Concat(past, k)``, written as ``present``; then an
    MLP sub-block and a final LayerNorm."""
    b = Builder(seed)
    h = _ln(b, "x", "l0.ln1")
    q, k = (_linear(b, h, D, D, f"l0.{n}") for n in "qk")
    kv = b.op("Concat", "past", k, axis=1, name="l0.cache", outputs=["present"])
    kt = b.op("Transpose", kv, perm=[0, 2, 1], name="l0.kt")
    p = b.op("Softmax", b.op("MatMul", q, kt, name="l0.scores"), axis=-1, name="l0.softmax")
    o = _linear(b, b.op("MatMul", p, kv, name="l0.ctx"), D, D, "l0.o")
    x = mlp(b, b.op("Add", "x", o, name="l0.res1"), "l0")
    b.op("LayerNormalization", x, b.const(np.ones(D, np.float32), "lnf.scale"),
         b.const(np.zeros(D, np.float32), "lnf.bias"), name="lnf", axis=-1, outputs=["y"])
    return b.model({"x": [1, S, D], "past": [1, P, D]},
                   {"y": [1, S, D], "present": [1, P + S, D]})


def gqa_decoder(attn_scale: float = 1.0, seed: int = 0):
    """``x [1, 4, 8]`` → attention sub-block ``x + o(GroupQueryAttention(q, k, v, past))``
    (4 query heads, 2 KV heads of 16; caches ``past_k``/``past_v`` ``[1, 2, 3, 16]`` in,
    ``present_k``/``present_v`` ``[1, 2, 7, 16]`` out) → MLP sub-block → ``y``."""
    from onnx import helper

    b = Builder(seed)
    q, k, v = (b.op("MatMul", "x", _w(b, 8, n, name=f"a.{c}.w"), name=f"a.{c}")
               for c, n in (("q", 64), ("k", 32), ("v", 32)))
    attn = b.op("GroupQueryAttention", q, k, v, "past_k", "past_v",
                b.const(np.full(1, 6, np.int32), "seqlens_k", np.int32),
                b.const(np.array(7, np.int32), "total_len", np.int32), domain="com.microsoft",
                name="a.gqa", outputs=["a.ctx", "present_k", "present_v"], num_heads=4,
                kv_num_heads=2)[0]
    x = b.op("Add", "x", _linear(b, attn, 64, 8, "a.o", 0.3 * attn_scale), name="a.res")
    h = b.op("Relu", _linear(b, x, 8, 16, "m.up"), name="m.relu")
    b.op("Add", x, _linear(b, h, 16, 8, "m.down"), name="m.res", outputs=["y"])
    cache, present = [1, 2, 3, 16], [1, 2, 7, 16]
    graph = b.graph({"x": [1, 4, 8], "past_k": cache, "past_v": cache},
                    {"y": [1, 4, 8], "present_k": present, "present_v": present})
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


VOCAB = 20


def gqa_token_decoder(scales: dict[str, float] | None = None, layers: int = 2, seed: int = 0):
    """A token decoder as onnxruntime-genai lays it out: ``input_ids [1, S]``,
    ``attention_mask [1, T]`` (its length only), caches ``past_key_values.<i>.key/value``
    ``[1, 2, P, 16]`` → embedding (vocab 20, hidden 8) → per layer an attention sub-block
    (GroupQueryAttention, 4 query heads, 2 KV heads of 16, ``present.<i>.key/value`` out; its
    residual Add is ``l<i>.res1``) and an MLP sub-block (``l<i>.res2``) → ``logits``."""
    from onnx import helper

    scales = scales or {}
    b = Builder(seed)
    # every position attends (the mask's values are not read: random validation masks)
    length = b.op("Gather", b.op("Shape", "attention_mask"), b.const(1), axis=0)
    total = b.op("Cast", length, to=onnx.TensorProto.INT32, name="total_len")
    seqlens = b.op("Cast", b.op("Sub", b.op("Unsqueeze", length, b.const([0])), b.const(1)),
                   to=onnx.TensorProto.INT32, name="seqlens_k")
    x = b.op("Gather", _w(b, VOCAB, 8, name="embed", scale=1.0), "input_ids", name="embed")
    inputs: dict = {"input_ids": (["batch", "seq"], onnx.TensorProto.INT64),
                    "attention_mask": (["batch", "total"], onnx.TensorProto.INT64)}
    outputs: dict = {}
    for i in range(layers):
        p = f"l{i}"
        q, k, v = (b.op("MatMul", x, _w(b, 8, n, name=f"{p}.{c}.w"), name=f"{p}.{c}")
                   for c, n in (("q", 64), ("k", 32), ("v", 32)))
        past = [f"past_key_values.{i}.{kv}" for kv in ("key", "value")]
        present = [f"present.{i}.{kv}" for kv in ("key", "value")]
        attn = b.op("GroupQueryAttention", q, k, v, *past, seqlens, total,
                    domain="com.microsoft", name=f"{p}.gqa", outputs=[f"{p}.ctx", *present],
                    num_heads=4, kv_num_heads=2)[0]
        o = _linear(b, attn, 64, 8, f"{p}.o", 0.3 * scales.get(f"{p}.res1", 1.0))
        x = b.op("Add", x, o, name=f"{p}.res1")
        h = b.op("Relu", _linear(b, x, 8, 16, f"{p}.up"), name=f"{p}.relu")
        down = _linear(b, h, 16, 8, f"{p}.down", 0.3 * scales.get(f"{p}.res2", 1.0))
        x = b.op("Add", x, down, name=f"{p}.res2")
        for name in past:
            inputs[name] = ([1, 2, "past", 16], onnx.TensorProto.FLOAT)
        for name in present:
            outputs[name] = ([1, 2, "total", 16], onnx.TensorProto.FLOAT)
    b.op("MatMul", x, _w(b, 8, VOCAB, name="lm_head", scale=1.0), name="lm_head",
         outputs=["logits"])
    graph = b.graph(inputs, {"logits": (["batch", "seq", VOCAB], onnx.TensorProto.FLOAT)}
                    | outputs)
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
