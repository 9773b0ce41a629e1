"""Random transformer-like graphs over ``[batch, seq, width]`` for the fuzzer (a share of the
seeds; see ``tests/fuzz_graphs.py``).

Attention is where SPA's coupling is most intricate (head splits chosen among reshape factors,
grouped-query repetition, fused QKV projections), so these graphs draw it with random head
counts and head sizes, separate or fused Q/K/V (cut by Split or Slice), head splits by
``Reshape`` with ``0``/``-1``/literal entries, K/V repetition by Expand or Tile, masks, and mix
it with dense layers, gated MLPs, residuals, LayerNorm, Concat/Split of the width, and heads
that pool, pick a token or stay per token. Batch and sequence are static or symbolic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from fuzz_graphs import FuzzGraph
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Seq:
    """A live activation ``[batch, seq, d]``."""

    name: str
    d: int


class SeqGraph(FuzzGraph):
    """``SeqGraph(seed).case()``: a random transformer-ish model with its prune options."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.opset = int(self.rng.choice([17, 18, 20]))
        self.seq: int | str = "S" if self.chance(0.3) else self.randint(2, 6)
        self.seqs: list[Seq] = []

    def s_pick(self) -> Seq:
        p = np.arange(1, len(self.seqs) + 1, dtype=np.float64) ** 1.5
        return self.seqs[int(self.rng.choice(len(self.seqs), p=p / p.sum()))]

    def linear(self, x: str, d_in: int, d_out: int, bias: bool | None = None) -> str:
        y = self.op1("MatMul", [x, self.weight((d_in, d_out), d_in, row_axis=1)])
        if bias if bias is not None else self.chance(0.6):
            y = self.op1("Add", [y, self.vector(d_out, 0.1)])
        return y

    def push(self, name: str, d: int) -> bool:
        self.seqs.append(Seq(name, d))
        return True

    # --- layers ---------------------------------------------------------------------------------
    def dense(self) -> bool:
        x = self.s_pick()
        d = self.randint(2, 24)
        y = self.linear(x.name, x.d, d)
        if self.chance(0.6):
            y = self.op1(self.choice(["Relu", "Sigmoid", "Tanh", "Softplus"]), [y])
        self.ops.append("seq:dense")
        return self.push(y, d)

    def mlp(self) -> bool:
        """``x + down(act(gate(x)) * up(x))`` (gated) or ``x + down(act(up(x)))``."""
        x = self.s_pick()
        f = self.randint(2, 24)
        h = self.op1(self.choice(["Relu", "Sigmoid", "Tanh"]), [self.linear(x.name, x.d, f)])
        if self.chance(0.5):
            h = self.op1("Mul", [h, self.linear(x.name, x.d, f)])
        y = self.op1("Add", [x.name, self.linear(h, f, x.d)])
        self.ops.append("seq:mlp")
        return self.push(y, x.d)

    def norm(self) -> bool:
        x = self.s_pick()
        y = self.op1("LayerNormalization", [x.name, self.vector(x.d, 1.0), self.vector(x.d, 0.1)],
                     axis=-1)
        self.ops.append("seq:layernorm")
        return self.push(y, x.d)

    def width_concat(self) -> bool:
        a, b = self.s_pick(), self.s_pick()
        self.ops.append("seq:concat")
        return self.push(self.op1("Concat", [a.name, b.name], axis=-1), a.d + b.d)

    def width_split(self) -> bool:
        x = self.s_pick()
        if x.d < 2:
            return False
        k = self.randint(1, x.d - 1)
        for o, d in zip(self.node("Split", [x.name, self.const([k, x.d - k])], 2, axis=2),
                        (k, x.d - k)):
            self.push(o, d)
        self.ops.append("seq:split")
        return True

    def attention(self) -> bool:
        x = self.s_pick()
        heads, hd = self.randint(1, 4), self.randint(1, 4)
        kv = self.choice([h for h in range(1, heads + 1) if heads % h == 0])
        q, k, v = self._qkv(x, heads, kv, hd)
        q, k, v = self._split(q, heads, hd), self._split(k, kv, hd), self._split(v, kv, hd)
        if kv < heads:
            k, v = self._repeat(k, kv, heads, hd), self._repeat(v, kv, heads, hd)
        scores = self.op1("MatMul", [q, self.op1("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = self.op1("Mul", [scores, self.const(np.float32(1 / math.sqrt(hd)))])
        if isinstance(self.seq, int) and self.chance(0.3):
            mask = np.triu(np.full((self.seq, self.seq), -1e4, np.float32), 1)
            scores = self.op1("Add", [scores, self.const(mask)])
        ctx = self.op1("MatMul", [self.op1("Softmax", [scores], axis=-1), v])
        ctx = self.op1("Transpose", [ctx], perm=[0, 2, 1, 3])
        merged = self.op1("Reshape", [ctx, self.const(self.choice([[0, 0, heads * hd],
                                                                   [0, 0, -1]]))])
        d_out = x.d if self.chance(0.6) else self.randint(2, 16)
        y = self.linear(merged, heads * hd, d_out)
        y = self.op1("Add", [x.name, y]) if d_out == x.d else y
        self.ops.append(f"seq:attention:h{heads}kv{kv}d{hd}")
        return self.push(y, d_out)

    def _qkv(self, x: Seq, heads: int, kv: int, hd: int) -> list[str]:
        widths = [heads * hd, kv * hd, kv * hd]
        if not self.chance(0.4):
            return [self.linear(x.name, x.d, w) for w in widths]
        fused = self.linear(x.name, x.d, sum(widths))  # fused QKV, cut by Split or Slice
        self.ops.append("seq:fused_qkv")
        if self.chance(0.5):
            return self.node("Split", [fused, self.const(widths)], 3, axis=-1)
        starts = np.cumsum([0, *widths[:-1]]).tolist()
        return [self.op1("Slice", [fused, self.const([s]), self.const([s + w]),
                                   self.const([-1])]) for s, w in zip(starts, widths)]

    def _split(self, t: str, heads: int, hd: int) -> str:
        """``[B, S, heads·hd] → [B, heads, S, hd]``."""
        target = self.choice([[0, 0, heads, hd], [0, -1, heads, hd], [0, 0, heads, -1]])
        return self.op1("Transpose", [self.op1("Reshape", [t, self.const(target)])],
                        perm=[0, 2, 1, 3])

    def _repeat(self, t: str, kv: int, heads: int, hd: int) -> str:
        """``[B, kv, S, hd] → [B, heads, S, hd]``: HF's Expand + Reshape, or Tile (cyclic)."""
        if self.chance(0.5) or not isinstance(self.seq, int) or self.batch != 1:
            return self.op1("Tile", [t, self.const([1, heads // kv, 1, 1])])
        u = self.op1("Unsqueeze", [t, self.const([2])])
        e = self.op1("Expand", [u, self.const([1, kv, heads // kv, self.seq, hd])])
        return self.op1("Reshape", [e, self.const([1, heads, self.seq, hd])])

    def seq_head(self, x: Seq, k: int) -> tuple[str, list]:
        kind = self.choice(["mean", "token", "per_token"])
        self.ops.append(f"seq:head:{kind}")
        if kind == "mean":
            r = self.op1("ReduceMean", [x.name, self.const([1])], keepdims=0) \
                if self.opset >= 18 else self.op1("ReduceMean", [x.name], axes=[1], keepdims=0)
            return self.linear(r, x.d, k, bias=True), [self.batch, k]
        if kind == "token":
            t = self.op1("Gather", [x.name, self.const(np.int64(0))], axis=1)
            return self.linear(t, x.d, k, bias=True), [self.batch, k]
        return self.linear(x.name, x.d, k, bias=True), [self.batch, self.seq, k]

    # --- the model ------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        d0, d1 = self.randint(2, 12), self.randint(2, 16)
        self.push("x", d0)
        self.push(self.linear("x", d0, d1), d1)
        layers = [self.attention] * 4 + [self.dense, self.mlp, self.mlp, self.norm,
                                         self.width_concat, self.width_split]
        for _ in range(self.randint(2, 7)):
            for _attempt in range(5):
                if self.choice(layers)():
                    break
        leaves = [s for s in self.seqs if s.name not in self.used and s.name != "x"]
        k = self.randint(2, 5)
        outputs = dict(self.seq_head(s, k) for s in leaves)
        graph = helper.make_graph(
            self.nodes, f"fuzzseq{self.seed}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [self.batch, self.seq, d0])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            [numpy_helper.from_array(v, n) for n, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=10)
        onnx.checker.check_model(model, full_check=True)
        return model

    def check_dims(self) -> dict[str, int]:
        dims = {"N": 2} if self.batch == "N" else {}
        if self.seq == "S":
            dims["S"] = 5
        return dims
