"""ONNX's recurrent ops (LSTM, GRU, RNN) in torch, for ``spa.torch.from_onnx``.

The ONNX semantics, step by step, so that gradients reach ``W``, ``R``, ``B`` and the
peepholes as initializers named in the graph (``torch.nn.LSTM`` holds its own parameters, in
another gate order). Gate order as ONNX stores them: LSTM ``i, o, f, c``, GRU ``z, r, h``.
All of the spec's options are followed: the directions (forward, reverse, bidirectional), both
layouts, ``sequence_lens`` (a sequence's state stops at its length and its later outputs are
zero; a reverse pass starts at its last real step), initial states, LSTM peepholes and
``input_forget``, GRU ``linear_before_reset``, ``clip`` (on the activations' inputs) and the
activation functions with their ``activation_alpha``/``activation_beta``.

The input projection of every step is one matrix product up front; the recurrence is a loop
over the steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F

Act = Callable[[torch.Tensor], torch.Tensor]

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"),
                       "RNN": ("Tanh",)}

# name → (function of (x, alpha, beta), its default alpha, its default beta); None: unused
_ACTIVATIONS: dict[str, tuple[Callable[..., torch.Tensor], float | None, float | None]] = {
    "Sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "Tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "Relu": (lambda x, a, b: torch.relu(x), None, None),
    "Softsign": (lambda x, a, b: F.softsign(x), None, None),
    "Softplus": (lambda x, a, b: F.softplus(x), None, None),
    "HardSigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0, 1), 0.2, 0.5),
    "LeakyRelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, None),
    "ThresholdedRelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "Elu": (lambda x, a, b: F.elu(x, a), 1.0, None),
    "Affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "ScaledTanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
}


def activations(op: str, attrs: dict, directions: int) -> list[list[Act]]:
    """Per direction, the op's activation functions, taking ``activation_alpha`` and
    ``activation_beta`` in order by the functions that have the parameter. ValueError: one
    is unknown, or their count is not the op's per direction."""
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in attrs.get("activations", ())] or \
        list(DEFAULT_ACTIVATIONS[op]) * directions
    per = len(DEFAULT_ACTIVATIONS[op])
    if len(names) != per * directions:
        raise ValueError(f"{op} has {len(names)} activations; {per * directions} expected")
    alphas, betas = list(attrs.get("activation_alpha", ())), list(attrs.get("activation_beta", ()))
    fns: list[Act] = []
    for name in names:
        known = _known(name)
        if known is None:
            raise ValueError(f"{op} activation {name} is not supported; supported: "
                             f"{', '.join(_ACTIVATIONS)}")
        _, da, db = known
        a = alphas.pop(0) if da is not None and alphas else None
        b = betas.pop(0) if db is not None and betas else None
        fns.append(cast(Act, activation(name, a, b)))
    return [fns[d * per:(d + 1) * per] for d in range(directions)]


def activation(name: str, alpha: float | None = None, beta: float | None = None
               ) -> Act | None:
    """The activation function ``name`` (any case) with ``alpha`` and ``beta`` where it takes
    them (its defaults when None); None when it is not one of :data:`_ACTIVATIONS`. Also
    onnxruntime's FusedConv's."""
    known = _known(name)
    if known is None:
        return None
    fn, da, db = known
    return functools.partial(_apply, fn, da if alpha is None else alpha,
                             db if beta is None else beta)


def _known(name: str) -> tuple[Callable[..., torch.Tensor], float | None, float | None] | None:
    return {k.lower(): v for k, v in _ACTIVATIONS.items()}.get(name.lower())


def _apply(fn: Callable[..., torch.Tensor], a: float | None, b: float | None,
           x: torch.Tensor) -> torch.Tensor:
    return fn(x, a, b)


def directions(attrs: dict) -> int:
    """2 for a bidirectional node, else 1."""
    return 2 if _direction(attrs) == "bidirectional" else 1


def _direction(attrs: dict) -> str:
    d = attrs.get("direction", "forward")
    return d.decode() if isinstance(d, bytes) else str(d)


def run(op: str, attrs: dict, x: Sequence[torch.Tensor | None]
        ) -> tuple[torch.Tensor, ...]:
    """The outputs of an LSTM, GRU or RNN node: ``Y``, ``Y_h`` (and ``Y_c`` for LSTM)."""
    xs, w, r = x[0], x[1], x[2]
    assert xs is not None and w is not None and r is not None
    b = x[3] if len(x) > 3 else None
    lens = x[4] if len(x) > 4 else None
    layout = int(attrs.get("layout", 0))
    if layout:  # [batch, seq, input] → [seq, batch, input]
        xs = xs.transpose(0, 1)
    direction = _direction(attrs)
    dirs = directions(attrs)
    hidden = int(r.shape[-1])
    gates = GATES[op]
    steps, batch = int(xs.shape[0]), int(xs.shape[1])

    def state(i: int) -> torch.Tensor | None:
        s = x[i] if len(x) > i else None
        return None if s is None else (s.transpose(0, 1) if layout else s)

    h0, c0 = state(5), state(6) if op == "LSTM" else None
    peep = x[7] if op == "LSTM" and len(x) > 7 else None
    fns = activations(op, attrs, dirs)
    clip = attrs.get("clip")
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        zero = xs.new_zeros(batch, hidden)
        h = zero if h0 is None else h0[d]
        c = zero if c0 is None else c0[d]
        wb = rb = None
        if b is not None:
            wb, rb = b[d, :gates * hidden], b[d, gates * hidden:]
        proj = xs @ w[d].T  # [steps, batch, gates·hidden], every step at once
        if wb is not None:
            proj = proj + wb
        out: list[torch.Tensor | None] = [None] * steps
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            h_new, c_new = _step(op, attrs, proj[t], h, c, r[d], rb,
                                 None if peep is None else peep[d], fns[d], clip)
            if lens is not None:  # past its length a sequence keeps its state, outputs zero
                live = (t < lens.to(torch.int64)).to(h.dtype)[:, None]
                h = live * h_new + (1 - live) * h
                c = live * c_new + (1 - live) * c
                out[t] = live * h_new
            else:
                h, c = h_new, c_new
                out[t] = h
        ys.append(torch.stack(out))  # type: ignore[arg-type]
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, 1)  # [steps, dirs, batch, hidden]
    y_h, y_c = torch.stack(hs), torch.stack(cs)  # [dirs, batch, hidden]
    if layout:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    return (y, y_h, y_c) if op == "LSTM" else (y, y_h)


def _step(op: str, attrs: dict, proj: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
          r: torch.Tensor, rb: torch.Tensor | None, peep: torch.Tensor | None,
          fns: list[Act], clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: the new hidden state and (LSTM) cell state."""
    def act(fn: Act, v: torch.Tensor) -> torch.Tensor:
        return fn(v if clip is None else torch.clamp(v, -clip, clip))

    n = h.shape[-1]
    if op == "GRU":
        wz, wr, wh = proj.split(n, -1)
        rz, rr, rh = r.split(n, 0)
        bz, br, bh = (None, None, None) if rb is None else rb.split(n)
        z = act(fns[0], wz + _lin(h, rz, bz))
        reset = act(fns[0], wr + _lin(h, rr, br))
        if attrs.get("linear_before_reset", 0):
            cand = act(fns[1], wh + reset * _lin(h, rh, bh))
        else:
            cand = act(fns[1], wh + _lin(reset * h, rh, bh))
        return (1 - z) * cand + z * h, c
    pre = proj + _lin(h, r, rb)
    if op == "RNN":
        return act(fns[0], pre), c
    pi, po, pf, pc = pre.split(n, -1)
    if peep is not None:
        peep_i, peep_o, peep_f = peep.split(n)
        pi, pf = pi + peep_i * c, pf + peep_f * c
    i = act(fns[0], pi)
    f = 1 - i if attrs.get("input_forget", 0) else act(fns[0], pf)
    c_new = f * c + i * act(fns[1], pc)
    if peep is not None:
        po = po + peep_o * c_new
    o = act(fns[0], po)
    return o * fns[2](c_new), c_new


def _lin(h: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = h @ r.T
    return out if b is None else out + b
