"""Random architectures from a seed, for fuzzing SPA (``tests/test_fuzz.py``).

One seed → one small ONNX model built with ``onnx.helper``: a random DAG over NCHW activations
(fan-out, residual Add/Mul, Concat, Split, Slice, grouped and depthwise Conv, ConvTranspose,
BatchNorm, activations in op and decomposed form, pooling, NHWC round trips through Transpose,
Reshape round trips with literal and run-time targets, Resize, Pad) ending in Flatten/Gemm,
MatMul or conv heads. Some seeds call an op SPA has no rule for: a model-local *function* in the
custom domain ``fuzz.custom``, which onnxruntime inlines and runs, so the oracle still checks
the rest of the graph. Weights are He-scaled with random per-channel magnitudes, so every
criterion has something to rank. The same seed always gives the same model and options.

Replay a seed: ``python tests/fuzz_graphs.py SEED [-o model.onnx]`` writes the model and prints
the options; ``python tests/fuzz_graphs.py --sweep 0 500`` counts outcomes over a range.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graphs import IR_VERSION  # noqa: E402

from spa.passes.allocation import Target  # noqa: E402

CUSTOM_DOMAIN = "fuzz.custom"
OPSETS = (13, 17, 18, 20)
CRITERIA = ("l1", "l2", "random", "fpgm", "obspa")
MAX_SPATIAL = 12
MAX_FEATURES = 1024  # Flatten heads only below this many features


@dataclass(frozen=True)
class Act:
    """A live activation ``[batch, c, h, w]``."""

    name: str
    c: int
    h: int
    w: int


@dataclass
class FuzzCase:
    seed: int
    model: onnx.ModelProto
    options: dict
    custom_nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)  # sizes of symbolic input dims


class FuzzGraph:
    """Builds one random model; ``FuzzGraph(seed).case()`` returns it with its prune options."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.opset = int(self.rng.choice(OPSETS))
        self.batch: int | str = "N" if self.rng.random() < 0.3 else 1
        self.spatial = bool(self.rng.random() < 0.15)  # symbolic H and W
        self.inputs: list[Act] = []
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.functions: dict[str, onnx.FunctionProto] = {}
        self.pool: list[Act] = []
        self.used: set[str] = set()
        self.custom_nodes: list[str] = []
        self.ops: list[str] = []
        self._n = 0

    # --- small helpers --------------------------------------------------------------------------
    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi]."""
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def const(self, value, stem: str = "k", dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype or (np.int64 if np.asarray(value).dtype.kind in "iu"
                                                else np.float32))
        name = self.fresh(stem)
        self.inits[name] = arr
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int, row_axis: int = 0,
               stem: str = "w") -> str:
        """He-scaled random weight whose rows (``row_axis``) get random magnitudes 0.1–10×."""
        gain = math.exp(self.rng.uniform(math.log(0.5), math.log(2.0)))
        w = self.rng.standard_normal(shape) * gain * math.sqrt(2.0 / max(fan_in, 1))
        rows = np.exp(self.rng.uniform(math.log(0.1), math.log(10.0), shape[row_axis]))
        bshape = [1] * len(shape)
        bshape[row_axis] = shape[row_axis]
        return self.const((w * rows.reshape(bshape)).astype(np.float32), stem)

    def vector(self, n: int, scale: float = 0.5, positive: bool = False,
               shape: tuple[int, ...] | None = None) -> str:
        v = self.rng.standard_normal(n) * scale
        if positive:
            v = np.abs(v) + 0.5
        return self.const(v.astype(np.float32).reshape(shape or (n,)), "p")

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "",
             **attrs) -> list[str]:
        name = self.fresh(op.lower() + "_")
        outs = [f"{name}_y{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        self.used.update(i for i in inputs if i)
        return outs

    def op1(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.node(op, inputs, 1, domain, **attrs)[0]

    def pick(self, pred=None) -> Act | None:
        """A live activation, recent ones more likely (so graphs get deep, not only wide)."""
        cands = [a for a in self.pool if pred is None or pred(a)]
        if not cands:
            return None
        p = np.arange(1, len(cands) + 1, dtype=np.float64) ** 1.5
        return cands[int(self.rng.choice(len(cands), p=p / p.sum()))]

    def add(self, name: str, c: int, h: int, w: int) -> Act:
        a = Act(name, c, h, w)
        self.pool.append(a)
        return a

    def axes_input(self, op: str, axes: list[int], since: int) -> tuple[list[str], dict]:
        """(extra inputs, attrs) for an op that takes ``axes`` as an input from opset ``since``."""
        if self.opset >= since:
            return [self.const(axes)], {}
        return [], {"axes": axes}

    def batch_entry(self, infer: bool = True) -> int:
        """A Reshape target entry for the batch axis: copy it (0), literal 1 (static batch only),
        or infer it (-1; only when ``infer``, i.e. no other entry is -1)."""
        entries = [0] + ([1] if self.batch == 1 else []) + ([-1] if infer else [])
        return int(self.choice(entries))

    # --- layers ---------------------------------------------------------------------------------
    def conv(self) -> bool:
        x = self.pick()
        kind = self.choice(["plain", "plain", "plain", "grouped", "depthwise", "transpose"])
        k = self.choice([1, 3, 3])
        group, cout = 1, self.randint(2, 16)
        if kind == "grouped":
            divs = [d for d in range(2, x.c + 1) if x.c % d == 0]
            if not divs:
                return False
            group = self.choice(divs)
            cout = group * self.randint(1, max(1, 16 // group))
        elif kind == "depthwise":
            group, cout = x.c, x.c * self.choice([1, 1, 2])
        if kind == "transpose":
            return self._conv_transpose(x, k, cout, group)
        stride = 2 if x.h >= 4 and x.w >= 4 and self.chance(0.15) else 1
        dilation = 2 if k == 3 and stride == 1 and self.chance(0.15) else 1
        pad = (k // 2) * dilation
        attrs = {"group": group, "pads": [pad] * 4, "strides": [stride] * 2}
        if dilation > 1:
            attrs["dilations"] = [2, 2]
        ins = [x.name, self.weight((cout, x.c // group, k, k), x.c // group * k * k)]
        if self.chance(0.7):
            ins.append(self.vector(cout, 0.1))
        y = self.op1("Conv", ins, **attrs)
        self.add(y, cout, (x.h - 1) // stride + 1, (x.w - 1) // stride + 1)
        self.ops.append(f"conv:{kind}")
        return True

    def _conv_transpose(self, x: Act, k: int, cout: int, group: int) -> bool:
        if self.chance(0.5) and x.c % 2 == 0:
            group = 2
            cout = 2 * self.randint(1, 6)
        w = self.weight((x.c, cout // group, k, k), x.c * k * k // 2)
        ins = [x.name, w] + ([self.vector(cout, 0.1)] if self.chance(0.5) else [])
        y = self.op1("ConvTranspose", ins, group=group, pads=[k // 2] * 4)
        self.add(y, cout, x.h, x.w)
        self.ops.append("convtranspose")
        return True

    def bn(self) -> bool:
        x = self.pick()
        params = [self.vector(x.c, 1.0), self.vector(x.c, 0.3), self.vector(x.c, 0.3),
                  self.vector(x.c, 0.5, positive=True)]
        self.add(self.op1("BatchNormalization", [x.name, *params]), x.c, x.h, x.w)
        self.ops.append("bn")
        return True

    def act(self) -> bool:
        x = self.pick()
        kinds = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "gelu_erf", "swish", "Clip",
                 "PRelu", "HardSigmoid"]
        if self.opset >= 20:
            kinds.append("Gelu")
        if self.opset < 14:
            kinds.remove("HardSwish")
        kind = self.choice(kinds)
        if kind == "gelu_erf":
            t = self.op1("Div", [x.name, self.const(np.float32(math.sqrt(2.0)))])
            t = self.op1("Add", [self.op1("Erf", [t]), self.const(np.float32(1.0))])
            y = self.op1("Mul", [self.op1("Mul", [x.name, t]), self.const(np.float32(0.5))])
        elif kind == "swish":
            y = self.op1("Mul", [x.name, self.op1("Sigmoid", [x.name])])
        elif kind == "Clip":
            y = self.op1("Clip", [x.name, self.const(np.float32(-1.0)),
                                  self.const(np.float32(6.0))])
        elif kind == "PRelu":
            y = self.op1("PRelu", [x.name, self.vector(x.c, 0.3, shape=(x.c, 1, 1))])
        elif kind == "LeakyRelu":
            y = self.op1("LeakyRelu", [x.name], alpha=0.1)
        else:
            y = self.op1(kind, [x.name])
        self.add(y, x.c, x.h, x.w)
        self.ops.append(f"act:{kind}")
        return True

    def residual(self) -> bool:
        """``x ∘ f(x)`` with ``f`` a same-width conv (and BN, activation); ∘ is Add or Mul."""
        x = self.pick()
        t = self.op1("Conv", [x.name, self.weight((x.c, x.c, 3, 3), x.c * 9),
                              self.vector(x.c, 0.1)], pads=[1] * 4)
        if self.chance(0.5):
            t = self.op1("Relu", [t])
        how = self.choice(["Add", "Add", "Mul", "Sub"])
        if how == "Mul":
            t = self.op1("Sigmoid", [t])
        ins = [x.name, t] if self.chance(0.5) else [t, x.name]
        self.add(self.op1(how, ins), x.c, x.h, x.w)
        self.ops.append(f"residual:{how}")
        return True

    def binary(self) -> bool:
        """Add/Mul/Max of two existing activations of the same shape (joins two branches)."""
        a = self.pick()
        b = self.pick(lambda o: o != a and (o.c, o.h, o.w) == (a.c, a.h, a.w))
        if b is None:
            return False
        how = self.choice(["Add", "Mul", "Max", "Min"])
        self.add(self.op1(how, [a.name, b.name]), a.c, a.h, a.w)
        self.ops.append(f"binary:{how}")
        return True

    def channel_const(self) -> bool:
        x = self.pick()
        shape = self.choice([(1, x.c, 1, 1), (x.c, 1, 1), (1, 1, 1, x.w), (1,), (1, x.c, x.h, 1)])
        how = self.choice(["Mul", "Add", "Sub", "Div"])
        v = self.rng.standard_normal(shape) * 0.5
        if how == "Div":
            v = np.sign(v) * (np.abs(v) + 0.5)
        c = self.const(v.astype(np.float32), "p")
        ins = [x.name, c] if how in ("Sub", "Div") or self.chance(0.5) else [c, x.name]
        self.add(self.op1(how, ins), x.c, x.h, x.w)
        self.ops.append(f"const:{how}{len(shape)}")
        return True

    def se(self) -> bool:
        """Squeeze-and-excite: ``x * sigmoid(conv(relu(conv(gap(x)))))``."""
        x = self.pick()
        r = max(1, x.c // self.choice([2, 4]))
        s = self.op1("GlobalAveragePool", [x.name])
        s = self.op1("Conv", [s, self.weight((r, x.c, 1, 1), x.c), self.vector(r, 0.1)])
        s = self.op1("Relu", [s])
        s = self.op1("Conv", [s, self.weight((x.c, r, 1, 1), r), self.vector(x.c, 0.1)])
        s = self.op1(self.choice(["Sigmoid", "HardSigmoid"]), [s])
        self.add(self.op1("Mul", [x.name, s]), x.c, x.h, x.w)
        self.ops.append("se")
        return True

    def concat(self) -> bool:
        a = self.pick()
        if self.chance(0.15):  # along a spatial axis
            b = self.pick(lambda o: (o.c, o.w) == (a.c, a.w) and a.h + o.h <= MAX_SPATIAL)
            if b is None:
                return False
            self.add(self.op1("Concat", [a.name, b.name], axis=2), a.c, a.h + b.h, a.w)
            self.ops.append("concat:h")
            return True
        parts = [a]
        for _ in range(self.randint(1, 2)):
            o = self.pick(lambda o: (o.h, o.w) == (a.h, a.w))  # may repeat a tensor: x ++ x
            parts.append(o)
        if self.chance(0.5):
            self.rng.shuffle(parts)
        y = self.op1("Concat", [p.name for p in parts], axis=self.choice([1, -3]))
        self.add(y, sum(p.c for p in parts), a.h, a.w)
        self.ops.append(f"concat:{len(parts)}")
        return True

    def split(self) -> bool:
        x = self.pick(lambda a: a.c >= 2)
        if x is None:
            return False
        n = self.randint(2, min(3, x.c))
        cuts = sorted(self.rng.choice(np.arange(1, x.c), n - 1, replace=False).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, x.c])]
        if self.opset >= 18 and x.c % n == 0 and self.chance(0.4):
            outs = self.node("Split", [x.name], n, axis=1, num_outputs=n)
            sizes = [x.c // n] * n
        elif self.opset >= 13:
            outs = self.node("Split", [x.name, self.const(sizes)], n, axis=1)
        else:
            outs = self.node("Split", [x.name], n, axis=1, split=sizes)
        for o, s in zip(outs, sizes):
            self.add(o, s, x.h, x.w)
        self.ops.append(f"split:{n}")
        return True

    def slice(self) -> bool:
        x = self.pick()
        mode = self.choice(["channel", "channel", "channel", "channel_step", "spatial"])
        if mode == "spatial" and x.h >= 2:
            s = self.randint(0, x.h - 2)
            e = self.randint(s + 1, x.h)
            y = self.op1("Slice", [x.name, self.const([s]), self.const([e]), self.const([2])])
            self.add(y, x.c, e - s, x.w)
        elif mode == "channel_step" and x.c >= 3:
            y = self.op1("Slice", [x.name, self.const([0]), self.const([x.c]), self.const([1]),
                                   self.const([2])])
            self.add(y, (x.c + 1) // 2, x.h, x.w)
        elif x.c >= 2:
            s = self.randint(0, x.c - 1)
            e = self.randint(s + 1, x.c)
            start = s - x.c if self.chance(0.3) else s
            end = 2**62 if e == x.c and self.chance(0.5) else e
            ins = [x.name, self.const([start]), self.const([end])]
            ins += [self.const([self.choice([1, -3])])] if self.chance(0.8) else []
            if len(ins) == 3:  # no axes: starts/ends cover axes 0..
                ins = [x.name, self.const([0, start]), self.const([2**62, end])]
            y = self.op1("Slice", ins)
            self.add(y, e - s, x.h, x.w)
        else:
            return False
        self.ops.append(f"slice:{mode}")
        return True

    def pool_op(self) -> bool:
        x = self.pick()
        kind = self.choice(["MaxPool", "AveragePool", "AveragePool3", "GlobalAveragePool",
                            "GlobalMaxPool", "MaxPool3"])
        if kind == "MaxPool" and x.h >= 2 and x.w >= 2:
            y, h, w = self.op1("MaxPool", [x.name], kernel_shape=[2, 2], strides=[2, 2]), \
                x.h // 2, x.w // 2
        elif kind == "AveragePool" and x.h >= 2 and x.w >= 2:
            y, h, w = self.op1("AveragePool", [x.name], kernel_shape=[2, 2], strides=[2, 2]), \
                x.h // 2, x.w // 2
        elif kind in ("AveragePool3", "MaxPool3"):
            attrs = {"count_include_pad": self.randint(0, 1)} if kind == "AveragePool3" else {}
            y = self.op1(kind[:-1], [x.name], kernel_shape=[3, 3], pads=[1] * 4, **attrs)
            h, w = x.h, x.w
        elif kind.startswith("Global"):
            y, h, w = self.op1(kind, [x.name]), 1, 1
        else:
            return False
        self.add(y, x.c, h, w)
        self.ops.append(f"pool:{kind}")
        return True

    def nhwc(self) -> bool:
        """NCHW → NHWC → (something on the last axis) → NCHW."""
        x = self.pick()
        t = self.op1("Transpose", [x.name], perm=[0, 2, 3, 1])
        inner = self.choice(["none", "Relu", "bias", "dense", "dense", "softmax", "layernorm"])
        c = x.c
        if inner == "Relu":
            t = self.op1("Relu", [t])
        elif inner == "bias":
            t = self.op1("Add", [t, self.vector(c, 0.3)])
        elif inner == "dense":
            c = self.randint(2, 16)
            t = self.op1("MatMul", [t, self.weight((x.c, c), x.c, row_axis=1)])
            t = self.op1("Add", [t, self.vector(c, 0.1)]) if self.chance(0.5) else t
        elif inner == "softmax":
            t = self.op1("Softmax", [t], axis=-1)
        elif inner == "layernorm" and self.opset >= 17:
            t = self.op1("LayerNormalization", [t, self.vector(c, 1.0), self.vector(c, 0.1)],
                         axis=-1)
        self.add(self.op1("Transpose", [t], perm=[0, 3, 1, 2]), c, x.h, x.w)
        self.ops.append(f"nhwc:{inner}")
        return True

    def reshape(self) -> bool:
        x = self.pick()
        mode = self.choice(["hw", "hw", "runtime", "groups", "shuffle", "pixel"])
        if mode == "pixel":  # DepthToSpace then SpaceToDepth back, or the other way round
            d2s = {"mode": self.choice(["CRD", "DCR"]), "blocksize": 2}
            if x.c % 4 == 0:
                t = self.op1("Relu", [self.op1("DepthToSpace", [x.name], **d2s)])
                y = self.op1("SpaceToDepth", [t], blocksize=2)
            elif x.h % 2 == 0 and x.w % 2 == 0:
                t = self.op1("Relu", [self.op1("SpaceToDepth", [x.name], blocksize=2)])
                y = self.op1("DepthToSpace", [t], **d2s)
            else:
                return False
            self.add(y, x.c, x.h, x.w)
            self.ops.append(f"reshape:pixel:{d2s['mode']}")
            return True
        if mode in ("groups", "shuffle"):
            divs = [d for d in range(2, x.c) if x.c % d == 0]
            if not divs:
                return False
            g = self.choice(divs)
            t = self.op1("Reshape", [x.name, self.const([self.batch_entry(), g, x.c // g,
                                                          x.h, x.w])])
            if mode == "shuffle":
                t = self.op1("Transpose", [t], perm=[0, 2, 1, 3, 4])
            else:
                t = self.op1("Relu", [t])
            back = self.const([self.batch_entry(False), x.c, x.h, -1] if self.chance(0.5)
                              else [0, -1, x.h, x.w])
        else:
            if mode == "runtime":  # Shape → Slice [0:2] → Concat [-1]: x.view(N, C, -1)
                shape = self.op1("Shape", [x.name])
                head = self.op1("Slice", [shape, self.const([0]), self.const([2])])
                target = self.op1("Concat", [head, self.const([-1])], axis=0)
            else:
                target = self.const([self.batch_entry(False), x.c, -1] if self.chance(0.5)
                                    else [self.batch_entry(False), -1, x.h * x.w])
            t = self.op1("Reshape", [x.name, target])
            inner = self.choice(["none", "Relu", "softmax"])
            t = self.op1("Softmax", [t], axis=-1) if inner == "softmax" else \
                (self.op1("Relu", [t]) if inner == "Relu" else t)
            if mode == "runtime" and self.chance(0.5):
                back = self.op1("Shape", [x.name])  # reshape back to x's own shape
            else:
                back = self.const([self.batch_entry(), x.c, x.h, x.w] if self.chance(0.5)
                                  else [0, x.c, -1, x.w])
        self.add(self.op1("Reshape", [t, back]), x.c, x.h, x.w)
        self.ops.append(f"reshape:{mode}")
        return True

    def resize(self) -> bool:
        x = self.pick(lambda a: a.h * 2 <= MAX_SPATIAL and a.w * 2 <= MAX_SPATIAL)
        if x is None:
            return False
        mode = self.choice(["nearest", "linear"])
        how = self.choice(["scales", "sizes"]) if self.batch == 1 else "scales"
        if how == "scales":
            ins = [x.name, "", self.const(np.array([1, 1, 2, 2], np.float32))]
        else:
            ins = [x.name, "", "", self.const([1, x.c, 2 * x.h, 2 * x.w])]
        self.add(self.op1("Resize", ins, mode=mode), x.c, 2 * x.h, 2 * x.w)
        self.ops.append(f"resize:{how}")
        return True

    def pad(self) -> bool:
        x = self.pick()
        channel = self.chance(0.2)
        p = [0, self.randint(0, 1) if channel else 0, 1, self.randint(0, 1),
             0, 1 if channel else 0, self.randint(0, 1), 1]
        mode = self.choice(["constant", "constant", "reflect", "edge"])
        if channel or x.h < 2 or x.w < 2:
            mode = "constant"
        ins = [x.name, self.const(p)]
        if mode == "constant" and self.chance(0.5):
            ins.append(self.const(np.float32(0.5)))
        y = self.op1("Pad", ins, mode=mode)
        self.add(y, x.c + p[1] + p[5], x.h + p[2] + p[6], x.w + p[3] + p[7])
        self.ops.append(f"pad:{'channel' if channel else mode}")
        return True

    def custom(self) -> bool:
        """A call of a model-local function in ``fuzz.custom``: an op SPA has no rule for."""
        if self.chance(0.5):  # rarer than the others: it freezes much of a small graph
            return False
        x = self.pick()
        body = self.choice(["swish", "mix", "scale"])
        fname = f"Fuzz{body.capitalize()}"
        if fname not in self.functions:
            self.functions[fname] = self._function(fname, body)
        ins = [x.name] + ([self.vector(x.c, 1.0, shape=(x.c, 1, 1))] if body == "scale" else [])
        y = self.op1(fname, ins, domain=CUSTOM_DOMAIN)
        self.custom_nodes.append(self.nodes[-1].name)
        self.add(y, x.c, x.h, x.w)
        self.ops.append(f"custom:{body}")
        return True

    def _function(self, fname: str, body: str) -> onnx.FunctionProto:
        mk = helper.make_node
        if body == "swish":
            nodes = [mk("Sigmoid", ["X"], ["s"]), mk("Mul", ["X", "s"], ["Y"])]
            inputs = ["X"]
        elif body == "scale":
            nodes = [mk("Mul", ["X", "S"], ["Y"])]
            inputs = ["X", "S"]
        else:  # channel mixing: X + mean over channels — wrong if taken as element-wise
            if self.opset >= 18:
                nodes = [mk("Constant", [], ["ax"], value_ints=[1]),
                         mk("ReduceMean", ["X", "ax"], ["m"], keepdims=1)]
            else:
                nodes = [mk("ReduceMean", ["X"], ["m"], axes=[1], keepdims=1)]
            nodes.append(mk("Add", ["X", "m"], ["Y"]))
            inputs = ["X"]
        return helper.make_function(CUSTOM_DOMAIN, fname, inputs, ["Y"], nodes,
                                    [helper.make_opsetid("", self.opset)])

    def reorder(self) -> bool:
        """Split the channels and concatenate the parts in another order (a block permutation)."""
        x = self.pick(lambda a: a.c >= 2)
        if x is None:
            return False
        n = self.randint(2, min(3, x.c))
        cuts = sorted(self.rng.choice(np.arange(1, x.c), n - 1, replace=False).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, x.c])]
        parts = self.node("Split", [x.name, self.const(sizes)], n, axis=1) \
            if self.opset >= 13 else self.node("Split", [x.name], n, axis=1, split=sizes)
        order = self.rng.permutation(n).tolist()
        if order == sorted(order):
            order = order[::-1]
        parts = [self.op1("Relu", [p]) if self.chance(0.3) else p for p in parts]
        self.add(self.op1("Concat", [parts[i] for i in order], axis=1), x.c, x.h, x.w)
        self.ops.append("reorder")
        return True

    def tied(self) -> bool:
        """A second conv that shares an existing conv's weight (tied weights): as it is, or
        through a ``Transpose`` that SPA folds into a view of it — the kernel flipped over its
        diagonal, or the channel axes swapped (a tied decoder, from the first conv's output
        channels back to its input channels)."""
        convs = [n for n in self.nodes if n.op_type == "Conv" and n.input[1] in self.inits
                 and not any(a.name == "group" and a.i > 1 for a in n.attribute)]
        if not convs:
            return False
        src = self.choice(convs)
        w = self.inits[src.input[1]]
        how = self.choice(["shared", "kernel", "channels"])
        cin, cout = (w.shape[0], w.shape[1]) if how == "channels" else (w.shape[1], w.shape[0])
        x = self.pick(lambda a: a.c == cin)
        if x is None:
            return False
        k = w.shape[2]
        perm = {"kernel": [0, 1, 3, 2], "channels": [1, 0, 2, 3]}.get(how)
        wt = src.input[1] if perm is None else self.op1("Transpose", [src.input[1]], perm=perm)
        y = self.op1("Conv", [x.name, wt], pads=[k // 2] * 4)
        self.add(y, cout, x.h, x.w)
        self.ops.append(f"tied:{how}")
        return True

    def folded_weight(self) -> bool:
        """A conv whose weight is stored transposed (``Transpose`` of a constant, as TF writes
        it) and whose bias goes through a ``Cast``: SPA folds both into plain constants."""
        x = self.pick()
        cout = self.randint(2, 12)
        w = self.weight((cout, x.c, 3, 3), x.c * 9)
        self.inits[w] = np.ascontiguousarray(self.inits[w].transpose(2, 3, 1, 0))
        wt = self.op1("Transpose", [w], perm=[3, 2, 0, 1])
        b = self.op1("Cast", [self.const(self.rng.standard_normal(cout) * 0.1, dtype=np.float64)],
                     to=TensorProto.FLOAT)
        self.add(self.op1("Conv", [x.name, wt, b], pads=[1] * 4), cout, x.h, x.w)
        self.ops.append("folded_weight")
        return True

    def misc(self) -> bool:
        """Ops SPA must map or freeze: channel Gather, Tile, Expand, Squeeze round trips,
        channel reductions, normalisations, DepthToSpace, Einsum, Identity/Dropout/Cast."""
        x = self.pick()
        kind = self.choice(["gather", "tile", "expand", "unsqueeze", "reduce_c", "reduce_hw",
                            "instnorm", "lpnorm", "d2s", "einsum", "identity", "dropout", "cast",
                            "where"])
        c, h, w = x.c, x.h, x.w
        if kind == "gather":
            idx = self.rng.permutation(x.c)[:self.randint(1, x.c)]
            y, c = self.op1("Gather", [x.name, self.const(idx)], axis=1), len(idx)
        elif kind == "tile":
            reps = self.choice([2, 3])
            y, c = self.op1("Tile", [x.name, self.const([1, reps, 1, 1])]), x.c * reps
        elif kind == "expand":
            g = self.op1("GlobalAveragePool", [x.name])
            target = [1, x.c, x.h, x.w] if self.batch == 1 and self.chance(0.5) \
                else [1, 1, x.h, x.w]
            y = self.op1("Mul", [x.name, self.op1("Expand", [g, self.const(target)])])
        elif kind == "unsqueeze":
            extra, attrs = self.axes_input("Unsqueeze", [2], 13)
            t = self.op1("Relu", [self.op1("Unsqueeze", [x.name, *extra], **attrs)])
            extra, attrs = self.axes_input("Squeeze", [2], 13)
            y = self.op1("Squeeze", [t, *extra], **attrs)
        elif kind in ("reduce_c", "reduce_hw"):
            op = self.choice(["ReduceMean", "ReduceMax", "ReduceSum"])
            axes = [1] if kind == "reduce_c" else [2, 3]
            extra, attrs = self.axes_input(op, axes, 13 if op == "ReduceSum" else 18)
            r = self.op1(op, [x.name, *extra], keepdims=1, **attrs)
            y = self.op1(self.choice(["Add", "Mul"]), [x.name, r])
        elif kind == "instnorm":
            y = self.op1("InstanceNormalization", [x.name, self.vector(x.c, 1.0),
                                                   self.vector(x.c, 0.1)])
        elif kind == "lpnorm":
            y = self.op1("LpNormalization", [x.name], axis=1, p=2)
        elif kind == "d2s" and x.c % 4 == 0:
            y, c, h, w = self.op1("DepthToSpace", [x.name], blocksize=2), x.c // 4, 2 * x.h, \
                2 * x.w
        elif kind == "einsum":
            y, c = self.op1("Einsum", [x.name, self.weight((x.c, x.c), x.c, 1)],
                            equation="nchw,cd->ndhw"), x.c
        elif kind == "identity":
            y = self.op1("Identity", [x.name])
        elif kind == "dropout":
            y = self.op1("Dropout", [x.name])
        elif kind == "cast":
            y = self.op1("Cast", [x.name], to=TensorProto.FLOAT)
        elif kind == "where":
            cond = self.op1("Greater", [x.name, self.const(np.float32(0.0))])
            y = self.op1("Where", [cond, x.name, self.vector(x.c, 0.5, shape=(x.c, 1, 1))])
        else:
            return False
        self.add(y, c, h, w)
        self.ops.append(f"misc:{kind}")
        return True

    # --- heads and the model --------------------------------------------------------------------
    def head(self, x: Act, k: int) -> str:
        """Reduce ``x`` to ``[batch, k]`` through a random classifier head."""
        feats = x.c * x.h * x.w
        kinds = ["gap_gemm", "reduce_matmul", "conv_gap", "nhwc_matmul"]
        if feats <= MAX_FEATURES:
            kinds += ["flatten_gemm", "reshape_gemm"]
        kind = self.choice(kinds)
        self.ops.append(f"head:{kind}")
        if kind in ("gap_gemm", "flatten_gemm", "reshape_gemm"):
            if kind == "gap_gemm":
                f, n = self.op1("Flatten", [self.op1("GlobalAveragePool", [x.name])]), x.c
            elif kind == "flatten_gemm":
                f, n = self.op1("Flatten", [x.name], axis=1), feats
            else:
                target = [self.batch_entry(False), -1] if self.chance(0.6) else [-1, feats]
                f, n = self.op1("Reshape", [x.name, self.const(target)]), feats
            trans_b = self.randint(0, 1)
            w = self.weight((k, n) if trans_b else (n, k), n, row_axis=0 if trans_b else 1)
            return self.op1("Gemm", [f, w, self.vector(k, 0.1)], transB=trans_b)
        if kind == "reduce_matmul":
            extra, attrs = self.axes_input("ReduceMean", [2, 3], 18)
            r = self.op1("ReduceMean", [x.name, *extra], keepdims=0, **attrs)
            return self.op1("Add", [self.op1("MatMul", [r, self.weight((x.c, k), x.c, 1)]),
                                    self.vector(k, 0.1)])
        if kind == "conv_gap":
            y = self.op1("Conv", [x.name, self.weight((k, x.c, 1, 1), x.c), self.vector(k, 0.1)])
            return self.op1("Flatten", [self.op1("GlobalAveragePool", [y])])
        t = self.op1("Transpose", [x.name], perm=[0, 2, 3, 1])
        t = self.op1("MatMul", [t, self.weight((x.c, k), x.c, 1)])
        extra, attrs = self.axes_input("ReduceMean", [1, 2], 18)
        return self.op1("ReduceMean", [t, *extra], keepdims=0, **attrs)

    def control(self) -> bool:
        """An ``If`` or ``Loop`` whose body reads ``x`` and an initializer from the outer scope
        by name (implicit inputs): SPA must freeze both."""
        x = self.pick()
        scale = self.vector(x.c, 0.5, shape=(x.c, 1, 1))
        self.used.update((x.name, scale))  # read inside the body, by name
        mk = helper.make_node
        out_info = [helper.make_tensor_value_info(self.fresh("sub_y"), TensorProto.FLOAT, None)]
        if self.chance(0.5):
            cond = self.op1("Greater", [self.op1("ReduceSum", ["x"], keepdims=0),
                                        self.const(np.float32(0.0))])
            branches = {}
            for key, body in (("then_branch", [mk("Relu", [x.name], [out_info[0].name])]),
                              ("else_branch", [mk("Mul", [x.name, scale], [out_info[0].name])])):
                branches[key] = helper.make_graph(body, self.fresh(key), [], out_info)
            y = self.op1("If", [cond], **branches)
            self.ops.append("control:if")
        else:
            state, state_out, cond_in, cond_out = (self.fresh(n) for n in
                                                   ("s", "s_out", "c_in", "c_out"))
            body = helper.make_graph(
                [mk("Identity", [cond_in], [cond_out]),
                 mk("Mul", [state, scale], [self.fresh("m")]),
                 ],
                self.fresh("loop_body"),
                [helper.make_tensor_value_info(self.fresh("i"), TensorProto.INT64, []),
                 helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
                 helper.make_tensor_value_info(state, TensorProto.FLOAT, None)],
                [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
                 helper.make_tensor_value_info(state_out, TensorProto.FLOAT, None)])
            m = body.node[1].output[0]
            body.node.append(mk("Add", [m, x.name], [state_out]))  # reads x by name
            y = self.op1("Loop", [self.const(np.int64(2)), "", x.name], body=body)
            self.ops.append("control:loop")
        self.add(y, x.c, x.h, x.w)
        return True

    def build(self) -> onnx.ModelProto:
        cin, h, w = self.randint(1, 4), self.randint(3, 8), self.randint(3, 8)
        self.add("x", cin, h, w)
        if self.chance(0.15):
            self.add("x2", self.randint(1, 6), h, w)
        self.inputs = list(self.pool)
        # Start with a conv so that there is always a producer.
        c0 = self.randint(2, 12)
        self.add(self.op1("Conv", ["x", self.weight((c0, cin, 3, 3), cin * 9)], pads=[1] * 4),
                 c0, h, w)
        layers = [self.conv] * 6 + [self.bn, self.residual, self.binary, self.channel_const,
                                    self.se, self.concat, self.split, self.slice, self.nhwc,
                                    self.reshape, self.resize, self.pad, self.custom,
                                    self.reorder, self.tied, self.folded_weight, self.misc,
                                    self.misc, self.control] + \
            [self.act] * 3 + [self.pool_op] * 2
        for _ in range(self.randint(3, 12)):
            for _attempt in range(5):
                if self.choice(layers)():
                    break
        return self._finish()

    def dims(self, h: int, w: int) -> list[int | str | None]:
        """Declared spatial dims: concrete, or unknown when the input's are symbolic."""
        return [None, None] if self.spatial else [h, w]

    def _finish(self) -> onnx.ModelProto:
        leaves = [a for a in self.pool if a.name not in self.used and a not in self.inputs]
        k = self.randint(2, 6)
        heads = [self.head(a, k) for a in leaves]
        outputs = {}
        if len(heads) > 1 and self.chance(0.7):
            y = heads[0]
            for hd in heads[1:]:
                y = self.op1("Add", [y, hd])
            heads = [y]
        for hd in heads:
            outputs[hd] = [self.batch, k]
        inner = [a for a in self.pool if a.name in self.used and a not in self.inputs]
        if inner and self.chance(0.1):  # an intermediate activation is also an output
            a = self.choice(inner)
            outputs[a.name] = [self.batch, a.c, *self.dims(a.h, a.w)]
            self.ops.append("output:inner")
        values = self._value_outputs()
        spatial = ["H", "W"] if self.spatial else None
        graph = helper.make_graph(
            self.nodes, f"fuzz{self.seed}",
            [helper.make_tensor_value_info(a.name, TensorProto.FLOAT,
                                           [self.batch, a.c, *(spatial or [a.h, a.w])])
             for a in self.inputs if a.name in self.used],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()]
            + [helper.make_tensor_value_info(n, t, s) for n, (t, s) in values.items()],
            [numpy_helper.from_array(v, n) for n, v in self.inits.items()])
        imports = [helper.make_opsetid("", self.opset)]
        if self.functions:
            imports.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION,
                                  functions=list(self.functions.values()))
        onnx.checker.check_model(model, full_check=True)
        return model

    def _value_outputs(self) -> dict[str, tuple[int, list]]:
        """Sometimes graph outputs that are integer or bool *values* of an activation: its
        shape, one dim, its size, a comparison of its channel count, or an ArgMax over a spatial
        axis. Pruning must never change them (issue #12: a Shape output did). Drawn from a
        second generator, so that every seed's graph and options are otherwise unchanged."""
        rng = np.random.default_rng((self.seed, 12))
        acts = [a for a in self.pool if a not in self.inputs]
        out: dict[str, tuple[int, list]] = {}
        for _ in range(int(rng.integers(1, 3)) if acts and rng.random() < 0.25 else 0):
            a = acts[int(rng.integers(len(acts)))]
            kind = ("shape", "dim", "size", "equal", "argmax")[int(rng.integers(5))]
            if kind == "shape":
                out[self.op1("Shape", [a.name])] = (TensorProto.INT64, [4])
            elif kind in ("dim", "equal"):
                dim = self.op1("Gather", [self.op1("Shape", [a.name]),
                                          self.const(np.int64(rng.integers(4)))], axis=0)
                if kind == "equal":
                    dim = self.op1("Equal", [dim, self.const(np.int64(a.c))])
                out[dim] = (TensorProto.BOOL if kind == "equal" else TensorProto.INT64, [])
            elif kind == "size":
                out[self.op1("Size", [a.name])] = (TensorProto.INT64, [])
            else:
                out[self.op1("ArgMax", [a.name], axis=3, keepdims=0)] = (
                    TensorProto.INT64, [self.batch, a.c, *self.dims(a.h, a.w)[:1]])
            self.ops.append(f"output:{kind}")
        return out

    def options(self) -> dict:
        """Random prune options: ratio 0.1–0.7, a criterion, sometimes global or a FLOPs target."""
        opts: dict = {"ratio": round(float(self.rng.uniform(0.1, 0.7)), 3),
                      "criterion": self.choice(CRITERIA), "seed": self.seed}
        if opts["criterion"] == "obspa":
            # With compensation the masked oracle does not apply: checked for shape and runs.
            opts.update(compensate=self.chance(0.3), samples=4,
                        input_dims=tuple(self.check_dims().items()))
        if self.chance(0.2):
            opts["global_ranking"] = True
        if self.chance(0.1):
            opts["round_to"] = 2
        if self.chance(0.1):
            opts["target"] = self.choice([Target.FLOPS, Target.PARAMS])
        convs = [n.name for n in self.nodes if n.op_type == "Conv"]
        if convs and self.chance(0.1):
            opts["ignore"] = (self.choice(convs),)
        return opts

    def check_dims(self) -> dict[str, int]:
        """Sizes of the symbolic input dims for the oracle: the generated ones (literal shape
        constants may assume them), and a batch of 2."""
        dims = {"N": 2} if self.batch == "N" else {}
        if self.spatial:
            dims.update(H=self.inputs[0].h, W=self.inputs[0].w)
        return dims

    def case(self) -> FuzzCase:
        model = self.build()
        return FuzzCase(self.seed, model, self.options(), self.custom_nodes, self.ops,
                        self.check_dims())


TORCH_EVERY = 10  # seeds 9, 19, 29, … are random PyTorch modules (tests/fuzz_torch.py)
SEQ_EVERY = 5  # seeds 3, 8, 13, … are transformer-like graphs (tests/fuzz_seq.py)


def fuzz_case(seed: int) -> FuzzCase:
    if seed % TORCH_EVERY == TORCH_EVERY - 1:
        return torch_case(seed)
    if seed % SEQ_EVERY == 3:
        from fuzz_seq import SeqGraph

        return SeqGraph(seed).case()
    return FuzzGraph(seed).case()


def torch_case(seed: int) -> FuzzCase:
    """A random PyTorch CNN exported by TorchScript, with this seed's random prune options."""
    from fuzz_torch import torch_model

    from models.export import _quiet

    with _quiet():
        model, dynamic, kinds = torch_model(seed)
    options = FuzzGraph(seed)
    options.batch, options.spatial = ("N" if dynamic else 1), False
    return FuzzCase(seed, model, options.options(), [], [f"torch:{k}" for k in kinds],
                    options.check_dims())


# --- running a case -----------------------------------------------------------------------------
def check_frozen_reasons(case: FuzzCase) -> None:
    """Fail closed: every live channel space on a tensor a custom-domain call reads or writes is
    frozen, with a reason naming that node."""
    from spa.api import analyze

    nodes = {n.name: n for n in case.model.graph.node}
    for g in analyze(case.model).groups:
        for name in case.custom_nodes:
            touched = {*nodes[name].input, *nodes[name].output}
            if any(m.space[0] in touched for m in g.members):
                assert any(f"'{name}'" in r for r in g.frozen), \
                    f"seed {case.seed}: group {g.name} touches custom node {name}: {g.frozen}"


def run_case(case: FuzzCase, out_dir: Path) -> str:
    """Prune ``case`` under the numeric oracle; return ``pruned``, ``unchanged`` (nothing was
    removed) or ``frozen`` (NothingPrunableError, with reasons). Anything else raises. The
    output holds no more parameters than the input, counted from the files' own tensors, each
    once (a tied weight is written once)."""
    from oracle import file_params, prune_checked

    from spa.api import analyze
    from spa.errors import NothingPrunableError

    check_frozen_reasons(case)
    ignore = case.options.get("ignore", ())
    try:
        if case.options.get("compensate"):
            out = _prune_compensated(case, out_dir)
        else:
            out = prune_checked(case.model, out_dir, dims=case.dims, **case.options)
    except NothingPrunableError:
        for g in analyze(case.model, ignore=ignore).groups:
            assert not g.prunable and (g.frozen or g.size <= 1 or not g.producers), g
        return "frozen"
    assert file_params(out.path) <= file_params(out_dir / "model.onnx")
    if ignore:
        _check_ignored(case, ignore)
    if case.seed % 5 == 0:
        _check_replay(out, out_dir)
    return "pruned" if out.report.channels_after < out.report.channels_before else "unchanged"


def _prune_compensated(case: FuzzCase, out_dir: Path):
    """OBSPA with its weight update: outputs keep names, shapes and dtypes and stay finite, and
    the emitted model's counts equal the prediction (the masked oracle does not apply)."""
    from oracle import Pruned, assert_file_params, run_model

    from spa.api import CheckOptions, PruneOptions, prune

    src = out_dir / "model.onnx"
    onnx.save(case.model, str(src))
    report, plan = prune(src, out_dir / "pruned.onnx", PruneOptions(**case.options),
                         CheckOptions(latency=False, input_dims=tuple(case.dims.items())))
    assert_file_params(report, src, out_dir / "pruned.onnx")
    assert report.params_after == report.predicted_params_after
    assert report.flops_after == report.predicted_flops_after
    outputs = run_model(out_dir / "pruned.onnx", dims=case.dims)
    assert all(np.isfinite(v).all() for v in outputs.values())
    return Pruned(report, plan, out_dir / "pruned.onnx")


def _check_ignored(case: FuzzCase, ignore: tuple[str, ...]) -> None:
    """Every group a user-ignored node touches is frozen and says so."""
    from spa.api import analyze

    node = next(n for n in case.model.graph.node if n.name == ignore[0])
    for g in analyze(case.model, ignore=ignore).groups:
        if g.producers and any(m.space[0] in (*node.input, *node.output) for m in g.members):
            assert any("is ignored" in r for r in g.frozen), g.frozen


def _check_replay(out, out_dir: Path) -> None:
    """``spa apply`` with the saved plan writes the same weights as the prune that made it."""
    from spa.api import CheckOptions, apply
    from spa.plan import Plan

    replay = out_dir / "replayed.onnx"
    apply(out_dir / "model.onnx", Plan.from_json(out.plan.to_json()), replay,
          CheckOptions(validate=False, latency=False))
    made = {t.name: t.SerializeToString() for t in onnx.load(str(out.path)).graph.initializer}
    again = {t.name: t.SerializeToString() for t in onnx.load(str(replay)).graph.initializer}
    assert made == again


def main(argv: list[str] | None = None) -> int:
    import argparse
    import collections
    import tempfile
    import time
    import traceback

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seed", type=int, nargs="?", help="write this seed's model and print options")
    ap.add_argument("-o", "--output", type=Path, help="where to write the model")
    ap.add_argument("--sweep", type=int, nargs=2, metavar=("FROM", "TO"),
                    help="run seeds FROM..TO-1 and count outcomes")
    args = ap.parse_args(argv)
    if args.sweep:
        counts: collections.Counter[str] = collections.Counter()
        ops: collections.Counter[str] = collections.Counter()
        t0 = time.perf_counter()
        for seed in range(*args.sweep):
            case = fuzz_case(seed)
            ops.update(o.split(":")[0] for o in case.ops)
            with tempfile.TemporaryDirectory() as d:
                try:
                    counts[run_case(case, Path(d))] += 1
                except Exception:  # noqa: BLE001 — a sweep reports every failure and goes on
                    counts["FAILED"] += 1
                    print(f"seed {seed} FAILED ({case.options}):\n{traceback.format_exc()}")
        print(dict(counts), f"{time.perf_counter() - t0:.0f} s")
        print("ops:", dict(ops.most_common()))
        return int(counts["FAILED"] > 0)
    if args.seed is None:
        ap.error("give a SEED or --sweep FROM TO")
    case = fuzz_case(args.seed)
    out = args.output or Path(f"fuzz{args.seed}.onnx")
    onnx.save(case.model, str(out))
    print(out, case.options, case.ops)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
