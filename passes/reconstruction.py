"""Reconstruction: refit each layer of the pruned model so that it answers like the dense one.

Post-training, with no gradients. The layers (Conv, Gemm, and MatMul by a constant, with its
bias: the Conv/Gemm/MatMulNBits bias input, or the constant of the one Add after a MatMul or a
MatMulNBits without one; a weight may be a float constant, or integers dequantised by a
DequantizeLinear or a chain of plain ops) are visited in topological order. For each, its
kept weights and bias are refitted by ridge least squares in float64, so that its output on
the *pruned* model's actual inputs — every earlier layer already refitted — matches the
*dense* model's output (on the dense inputs) at the channels it kept::

    W = argmin ‖X_pruned·W − Y_dense‖² + λ‖W − W₀‖²   (W₀: the weights after pruning)

Pulling towards ``W₀`` rather than zero keeps a layer whose rows say little where it was. λ is
chosen per layer among a few multiples of ``mean diag(XᵀX)`` by the error on validation rows
(an eighth of the calibration samples in contiguous runs, never fitted;
:func:`spa.calibration.validation_runs`), walking downhill from the previous layer's choice
(:func:`_ridge_search`); the refit is
kept only if it beats ``W₀`` there.
Convolutions are fitted on im2col rows at sampled output positions (per group for grouped and
depthwise convs), matmuls on sampled token rows.

Activations come from onnxruntime, in chunks of samples, a segment at a time
(passes/segments.py), so that the whole reconstruction costs about one pass of each model
plus the solves; for a token model, chunks of similar length cut after their last attended
column (``cut_padding``, :func:`spa.calibration.chunked`). ``memory`` bounds what is held
(activations and the two models' weights), the rest is spilled to disk. The refitted values
are returned by initializer name; the caller writes them. Reproducible: the same data and
seed give the same bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from spa.calibration import (
    attention_mask,
    by_token,
    chunked,
    padding_cut,
    sample_count,
    validation_runs,
)
from spa.errors import OptionError
from spa.ir import nbits
from spa.ir.contrib import value_dims
from spa.ir.dtypes import onnx_type
from spa.ir.packed import integer_range
from spa.ir.quant import codes_on, has_codes, quantized_weight, spread
from spa.ir.quant_chain import DequantChain, dequant_chain
from spa.memory import release
from spa.passes.segments import Frontiers, Runner, fixed_batch, unmap, with_types
from spa.progress import progress

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)  # λ / mean diag(XᵀX), tried per layer
CORRECT_RESIDUAL = True
WORKING_SHARE = 8  # 1/8 of the memory budget is kept for the chunk at work, not held
#: ``at(y, kept)``: a layer's sampled target rows taken from an output-shaped tensor, at the
#: output channels ``kept`` (None: all).
Rows = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass
class LayerFit:
    """One refitted layer: its node, and the relative output error on validation rows before
    (the pruned weights) and after."""

    node: str
    before: float
    after: float
    ridge: float | None  # None: the pruned weights were kept
    rows: int = 0  # least-squares rows sampled (fitted and validation)


@dataclass
class Reconstructed:
    """Refitted initializer values by name, and what each layer's refit achieved."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[LayerFit] = field(default_factory=list)

    def summary(self) -> dict:
        kept = [f for f in self.layers if f.ridge is not None]
        return {"layers": len(self.layers), "refitted": len(kept),
                "mean_error_before": _mean(f.before for f in self.layers),
                "mean_error_after": _mean(f.after for f in self.layers)}


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


@dataclass(frozen=True)
class _Layer:
    """A refittable node: where its weight, bias, data input and fitted output are."""

    index: int  # node position in the pruned graph
    node: str
    op: str
    weight: str
    bias: str | None
    data: str
    output: str  # the tensor matched to the dense model's (the Add's output for MatMul+Add)
    out_axis: int  # the weight's output-channel axis (of the stored integers, if chained)
    residual: str | None = None  # the other input of the residual Add the output feeds
    joined: str | None = None  # that Add's output (the stream with the layer's term added)
    codec: NBits | QDQ | None = None  # a quantised weight (``weight``: its integer tensor)
    #: where the pruned model is run to before the fit: the node, or the first DequantizeLinear
    #: of its weight or bias (spa-internal order: see :func:`_weights_by_their_layers`)
    fed_from: int | None = None
    bias_codec: QDQ | None = None  # a bias dequantised from int32 (``bias``: its integers)

    @property
    def fed_at(self) -> int:
        return self.index if self.fed_from is None else self.fed_from


@dataclass(frozen=True)
class NBits:
    """How a MatMulNBits holds its weight ``W [K, N]`` (spa/ir/nbits.py): ``B`` (the layer's
    ``weight``), its scales and packed zero points (None: the implicit ones)."""

    scales: str
    zero_points: str | None
    bits: int
    block_size: int
    k: int

    def weight(self, b: onnx.TensorProto, weights: Mapping[str, onnx.TensorProto]
               ) -> np.ndarray:
        """The dequantised ``W [K, N]`` (float64)."""
        scales, zp = self._own(weights)
        return self._held(numpy_helper.to_array(b), scales, zp)

    def requantized(self, w: np.ndarray, b_name: str, weights: Mapping[str, onnx.TensorProto]
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``W`` as the layer can hold it: codes on scales and zero points fitted to it block
        by block (:func:`spa.ir.nbits.fitted_scales`; the layer's own kept their blocks'
        pruned values, not the refit's range). Its ``B``, scales and zero points by
        initializer name, and the weight they hold. all-MiniLM-L6-v2 in int4: cosine to the
        int4 model 0.9240 refitted on the layers' own scales, 0.9312 on fresh ones
        (benchmarks/README.md)."""
        old_scales, old_zp = self._own(weights)
        scales, zp = nbits.fitted_scales(w, self.bits, self.block_size, old_zp is not None)
        scales = scales.astype(old_scales.dtype)
        b = nbits.requantize(w, scales, zp, self.bits, self.block_size)
        out = {b_name: b, self.scales: scales}
        if self.zero_points is not None and zp is not None and old_zp is not None:
            zp = out[self.zero_points] = zp[:, :old_zp.shape[1]]
        return out, self._held(b, scales, zp)

    def _own(self, weights: Mapping[str, onnx.TensorProto]
             ) -> tuple[np.ndarray, np.ndarray | None]:
        zp = None if self.zero_points is None \
            else numpy_helper.to_array(weights[self.zero_points])
        return numpy_helper.to_array(weights[self.scales]), zp

    def _held(self, b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
        return nbits.dequantize(b, scales, zp, self.bits, self.block_size, self.k)


@dataclass(frozen=True)
class QDQ:
    """How a weight reached through ``DequantizeLinear`` (or a chain of plain ops that does the
    same, spa/ir/quant_chain.py) is held: its integer tensor (the layer's ``weight``, int8 or
    uint8 and the like), and the scale and zero point (None: 0), one value or one per index of
    ``axis``. Dequantised in the integers' layout, then transposed by a chain's ``perm``."""

    scale: str
    zero_point: str | None
    axis: int | None
    block_size: int = 0  # blocked (opset 21): one scale per block of the axis
    perm: tuple[int, ...] | None = None  # a chain's Transpose after the dequantisation

    def weight(self, q: onnx.TensorProto, weights: Mapping[str, onnx.TensorProto]
               ) -> np.ndarray:
        """The dequantised weight (float64), as the layer reads it."""
        codes = numpy_helper.to_array(q)
        return self._laid(self._held(codes, *self._own(weights, codes.shape)))

    def _laid(self, w: np.ndarray, back: bool = False) -> np.ndarray:
        """``w`` in the integers' layout as the layer reads it (``back``: the other way)."""
        if self.perm is None:
            return w
        return np.transpose(w, np.argsort(self.perm) if back else self.perm)

    def requantized(self, w: np.ndarray, name: str, weights: Mapping[str, onnx.TensorProto],
                    *, widen: bool = False, rescale: np.ndarray | None = None
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``W`` as the layer can hold it: new codes, clipped to the integer type's range (a
        zero scale keeps its codes). Blocked, on scales and zero points fitted to it block by
        block, as for a MatMulNBits (:meth:`NBits.requantized`); else on its own, but for
        ``widen`` (per axis): an index whose values the codes cannot reach gets the least scale
        that reaches them, about its own zero point; ``rescale``: the scales times it (a bias
        whose weight's scales widened). The codes (and any new scales and zero points) by
        initializer name, and the weight they hold."""
        old = numpy_helper.to_array(weights[name])
        w = self._laid(w, back=True)
        scale, zp = self._stored(weights)
        out: dict[str, np.ndarray] = {}
        if self.block_size:
            scale, zp = self._fitted(w, old.dtype, scale, zp)
            out[self.scale] = scale
            if self.zero_point is not None and zp is not None:
                out[self.zero_point] = zp
        elif widen and self.axis is not None:
            wider = self._widened(w, old.dtype, scale, zp)
            if wider is not None:
                scale = out[self.scale] = wider
        elif rescale is not None:
            scale = out[self.scale] = (scale.astype(np.float64) * rescale.reshape(scale.shape)
                                       ).astype(scale.dtype)
        scale, zp = self._spread(scale, zp, old.shape)
        codes = out[name] = codes_on(w, scale, zp, old)
        return out, self._laid(self._held(codes, scale, zp))

    def _fitted(self, w: np.ndarray, dtype: np.dtype, scale: np.ndarray, zp: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scales (and zero points, when stored) fitted to ``w``'s blocks along the axis
        (:func:`spa.ir.nbits.fitted_steps`), in the types of the ones they replace; the codes
        are of ``dtype``."""
        assert self.axis is not None
        low, high = cast(tuple[int, int], integer_range(dtype))
        along = np.moveaxis(w, self.axis, -1)
        count = scale.shape[self.axis]
        padded = np.zeros((*along.shape[:-1], count * self.block_size))  # zeros: in any range
        padded[..., :along.shape[-1]] = along
        blocks = padded.reshape(*along.shape[:-1], count, self.block_size)
        steps, points = nbits.fitted_steps(blocks, low, high, None if zp is not None else 0.0)
        fitted = np.moveaxis(steps, -1, self.axis).astype(scale.dtype)
        return fitted, None if zp is None else np.moveaxis(points, -1, self.axis).astype(zp.dtype)

    def _widened(self, w: np.ndarray, dtype: np.dtype, scale: np.ndarray, zp: np.ndarray | None
                 ) -> np.ndarray | None:
        """The per-axis scales, each grown to the least that holds its index's values about its
        zero point (:func:`spa.ir.nbits.fitted_steps`) where the codes would clip them; None
        when none would."""
        assert self.axis is not None
        low, high = cast(tuple[int, int], integer_range(dtype))
        rows = np.moveaxis(w, self.axis, 0).reshape(w.shape[self.axis], -1)
        zero = np.zeros(rows.shape[0]) if zp is None else zp.astype(np.float64).reshape(-1)
        needed = nbits.fitted_steps(rows, low, high, zero)[0]
        old = scale.astype(np.float64).reshape(-1)
        grow = (old > 0) & (needed > old)
        if not grow.any():
            return None
        return np.where(grow, needed, old).astype(scale.dtype).reshape(scale.shape)

    def _own(self, weights: Mapping[str, onnx.TensorProto], shape: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:
        """The scale and zero point (float64), shaped to broadcast against the codes."""
        return self._spread(*self._stored(weights), shape)

    def _stored(self, weights: Mapping[str, onnx.TensorProto]
                ) -> tuple[np.ndarray, np.ndarray | None]:
        zp = None if self.zero_point is None \
            else numpy_helper.to_array(weights[self.zero_point])
        return numpy_helper.to_array(weights[self.scale]), zp

    def _spread(self, scale: np.ndarray, zp: np.ndarray | None, shape: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray]:
        zero = np.zeros(()) if zp is None else zp.astype(np.float64)
        return spread(scale.astype(np.float64), self.axis, shape, self.block_size), \
            spread(zero, self.axis, shape, self.block_size)

    @staticmethod
    def _held(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
        return (codes.astype(np.float64) - zp) * scale


class Reconstruction:
    """``Reconstruction(kept=…, rows=…, memory=…, seed=…).run(dense, pruned, inputs)``.

    ``kept``: per weight space ``(name, axis)``, the dense channels the pruned model kept
    (:func:`spa.plan.kept_indices`), to line the dense outputs up with the pruned ones.
    """

    def __init__(self, *, kept: Mapping[tuple[str, int], np.ndarray], rows: int = 8192,
                 memory: int = 2 << 30, seed: int = 0, chunk: int = 32,
                 max_rows: int | None = None, row_macs: int | None = None,
                 cut_padding: bool = False):
        self.kept, self.rows, self.memory = kept, rows, memory
        self.seed, self.chunk = seed, chunk
        self.max_rows, self.row_macs = max_rows, row_macs
        self.cut_padding = cut_padding  # chunks of similar length, cut (spa.calibration.chunked)

    def layer_rows(self, features: int) -> int:
        """The rows sampled for a layer of ``features`` inputs: ``rows``, raised towards
        ``max_rows`` while the normal equations cost at most ``row_macs`` multiply-adds
        (rows × features²), so that narrow and mid-width layers get many rows per unknown
        and the widest keep the floor's cost."""
        if self.max_rows is None or self.row_macs is None:
            return self.rows
        return max(self.rows, min(self.max_rows, self.row_macs // max(features, 1) ** 2))

    def run(self, dense: onnx.ModelProto, pruned: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
            *, pruned_feeds: Callable[[Arrays], Arrays] | None = None) -> Reconstructed:
        """Refit ``pruned``'s layers on ``inputs``; ``pruned_feeds``: a chunk of the dense
        model's inputs as the pruned model takes them (a decoder's caches lose heads)."""
        dense = with_types(dense)
        pruned = with_types(pruned)
        chains = _chains(pruned)  # by output name: the same after the reorder
        pruned = _weights_by_their_layers(pruned, chains)
        layers = _layers(pruned, chains)
        dense_pos = {n.name: i for i, n in enumerate(dense.graph.node)}
        layers = [la for la in layers if la.node in dense_pos]
        n = sample_count(inputs)
        step = fixed_batch(dense) or self.chunk
        if fixed_batch(dense):  # the model takes this many samples at a time
            n -= n % step
        cut = padding_cut(dense, inputs) if self.cut_padding else None
        index, chunks = chunked({k: v[:n] for k, v in inputs.items()}, step, cut)
        mask = attention_mask(dense)
        valid = [None if mask is None or mask not in c else np.asarray(c[mask]) != 0
                 for c in chunks]
        out = Reconstructed()
        if not layers or not chunks:
            return out
        weights = {i.name: i for i in pruned.graph.initializer}
        # the budget covers the two models too (each runner holds its model, and its
        # segment's session a copy of those weights) and the chunk at work: a segment's
        # outputs, the float64 rows (ResNet-50, 256 images, 2 GiB: with all of the rest held,
        # the process grew by 2.1 GiB during reconstruction)
        models = 2 * (_weight_bytes(dense) + _weight_bytes(pruned))
        held = max(self.memory - models - self.memory // WORKING_SHARE, self.memory // 4)
        start = 0  # the ridge search starts at the last refitted layer's choice
        facts = (_Tensors.of(dense), _Tensors.of(pruned))
        with Frontiers(held, "--calib-memory") as fronts:
            p_runner = Runner(pruned, fronts, "pruned",
                              [pruned_feeds(c) for c in chunks] if pruned_feeds else chunks)
            d_runner = Runner(dense, fronts, "dense", chunks)
            for k, layer in enumerate(progress(layers, "reconstruction", unit="layer")):
                target_stop = facts[0].producer(layer.output) + 1
                if target_stop <= d_runner.position:
                    log.info("reconstruction stops at %s: the graphs' orders differ", layer.node)
                    break
                layer = _joined(layer, facts, target_stop)
                if layer.joined is not None:  # the dense sum, through the residual Add
                    d_runner.advance(target_stop + 1, want=(layer.joined,))
                else:
                    d_runner.advance(target_stop, want=(layer.output,))
                p_runner.advance(layer.fed_at, want=(layer.data,))
                fit = self._fit(layer, pruned, weights, (p_runner, d_runner), k,
                                (index, valid), start)
                out.layers.append(fit[0])
                if fit[0].ridge is not None:
                    start = RIDGES.index(fit[0].ridge)
                for name, value in fit[1].items():
                    weights[name].CopyFrom(numpy_helper.from_array(value, name))
                    out.values[name] = value
                fronts.evict()
                release(collect=False)  # the evicted activations' pages
        return out

    def _fit(self, layer: _Layer, pruned: onnx.ModelProto,
             weights: dict[str, onnx.TensorProto], runners: tuple[Runner, Runner], k: int,
             chunks: tuple[list[np.ndarray], list[np.ndarray | None]], start: int = 0
             ) -> tuple[LayerFit, dict[str, np.ndarray]]:
        """Refit layer ``k`` on the pruned runner's inputs against the dense runner's outputs;
        ``chunks``: per chunk, its sample indices and the real-token positions (None: all);
        ``start``: the index in :data:`RIDGES` the ridge search starts from."""
        index, valid = chunks
        p_runner, d_runner = runners
        node = pruned.graph.node[layer.index]
        w0 = numpy_helper.to_array(weights[layer.weight]).astype(np.float64) \
            if layer.codec is None else layer.codec.weight(weights[layer.weight], weights)
        b0 = None if layer.bias is None else (
            numpy_helper.to_array(weights[layer.bias]).astype(np.float64)
            if layer.bias_codec is None else
            layer.bias_codec.weight(weights[layer.bias], weights)).reshape(-1)
        design = _Design.of(layer, node, w0)
        if design is None:
            return LayerFit(layer.node, math.nan, math.nan, None), {}
        total = sum(len(by_token(c[layer.data], v)) for c, v in
                    zip(p_runner.chunk_values(layer.data), valid))
        per_sample = max(1, math.ceil(self.layer_rows(design.columns)
                                      / max(total, 1)))
        fit, val = _Normal(design), _Normal(design)
        is_sample_val = validation_runs(total)
        # validation samples by index when the layer's first axis is the samples (chunks of
        # similar length hold them out of order), else by position (samples and tokens merged)
        by_sample = total == sum(map(len, index))
        sample = 0
        target = layer.joined or layer.output
        for c, (x_chunk, y_chunk) in enumerate(zip(p_runner.chunk_values(layer.data),
                                                   d_runner.chunk_values(target))):
            x_held, y_held = x_chunk[layer.data], y_chunk[target]
            x, y = by_token(x_held, valid[c]), by_token(y_held, valid[c])
            rng = np.random.default_rng([self.seed, k, c])
            xs, at, owner = design.rows(x, y.shape, per_sample, rng, valid[c])
            kept = self.kept.get((layer.weight, layer.out_axis))
            ys = at(y, kept)
            if layer.joined is not None:
                corrected = self._corrected(layer, (ys, y.shape), at, c, p_runner)
                if corrected is None:  # the streams do not line up: the layer keeps its weights
                    return LayerFit(layer.node, math.nan, math.nan, None), {}
                ys = corrected
            is_val = is_sample_val[index[c][owner] if by_sample else owner + sample]
            for normal, rows in ((fit, ~is_val), (val, is_val)):
                if rows.all():  # most chunks: no copy of the float64 rows (ResNet-50: 5 s)
                    normal.add(xs, ys)
                elif rows.any():
                    normal.add(xs[rows], ys[rows])
            sample += len(x)
            unmap(x_held, y_held)  # a spilled chunk's pages: not resident until the layer is done
        if fit.count == 0 or val.count == 0:
            return LayerFit(layer.node, math.nan, math.nan, None), {}
        theta0 = design.theta(w0, b0)
        e0 = val.error(theta0)
        best_ridge, best, best_err = _ridge_search(fit, val, theta0, start)
        if best_err >= e0 * (1 - 1e-6):  # the refit must beat the pruned weights
            best_ridge = None
        rows = fit.count + val.count
        if best_ridge is None or best is None:
            return LayerFit(layer.node, e0, e0, None, rows), {}
        w, b = design.weights(best, w0.shape)
        values = {}
        # a quantised weight or bias takes the refit as it can hold it: new codes on its own
        # scales (and the error is judged on what they hold)
        rescale = None  # how much a per-channel weight's scales widened, for its int32 bias
        if isinstance(layer.codec, QDQ):
            widen = _widens(layer, weights)
            held, w = layer.codec.requantized(w, layer.weight, weights, widen=widen)
            if widen and layer.codec.scale in held:
                rescale = held[layer.codec.scale].astype(np.float64) / numpy_helper.to_array(
                    weights[layer.codec.scale]).astype(np.float64)
            values.update(held)
        elif layer.codec is not None:  # (in its own layout: a MatMulNBits' [K, N], not its B)
            held, w = layer.codec.requantized(w, layer.weight, weights)
            values.update(held)
        else:
            values[layer.weight] = w.astype(numpy_helper.to_array(weights[layer.weight]).dtype)
            if values[layer.weight].dtype == np.float16:  # judged as float16 holds it
                w = values[layer.weight].astype(np.float64)
        if layer.bias is not None and b is not None:
            old = numpy_helper.to_array(weights[layer.bias])
            if layer.bias_codec is not None:
                codes, b = layer.bias_codec.requantized(b.reshape(old.shape), layer.bias, weights,
                                                        rescale=rescale)
                values.update(codes)
                b = b.reshape(-1)
            else:
                values[layer.bias] = b.reshape(old.shape).astype(old.dtype)
                if old.dtype == np.float16:
                    b = values[layer.bias].astype(np.float64).reshape(-1)
        if layer.codec is not None or layer.bias_codec is not None \
                or any(v.dtype == np.float16 for v in values.values()):
            best_err = val.error(design.theta(w, b))
            if best_err >= e0 * (1 - 1e-6):
                return LayerFit(layer.node, e0, e0, None, rows), {}
        return LayerFit(layer.node, e0, best_err, best_ridge, rows), values

    def _corrected(self, layer: _Layer, target: tuple[np.ndarray, tuple[int, ...]], at: Rows,
                   c: int, p_runner: Runner) -> np.ndarray | None:
        """The target rows of a layer whose output joins a residual stream: the dense *sum*
        (``target``: the residual Add's rows, and its shape) less the pruned stream, i.e.
        ``y_dense + (r_dense − r_pruned)``, so that the sum the Add makes matches the dense
        model's, not only the layer's own term: the layer repairs what the stream lost
        upstream. Taken at the sampled rows only (a whole chunk's correction in float64 is
        several of its copies), and from the sum the dense segment makes anyway: two gathers,
        not three. None: the pruned stream is not held, or its shape is not the layer's (a
        broadcast the shapes did not show)."""
        ys, shape = target
        name = cast(str, layer.residual)
        if not p_runner.holds(name):
            log.info("reconstruction keeps %s: its residual stream is not held", layer.node)
            return None
        held = p_runner.chunk_values(name)[c][name]
        stream = np.asarray(held)
        axis = 1 if layer.op == "Conv" else len(shape) - 1  # the channels
        gained = None if stream.ndim != len(shape) or any(
            a != b for i, (a, b) in enumerate(zip(stream.shape, shape)) if i != axis) \
            else at(stream, None)
        unmap(held)
        if gained is None or gained.shape != ys.shape:
            log.info("reconstruction keeps %s: its residual stream does not line up", layer.node)
            return None
        ys -= gained
        return ys


def _widens(layer: _Layer, weights: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether a refit may widen the layer's per-output-channel weight scales where its codes
    would clip: its bias, if quantised, has one scale per output channel, which widens with
    them (an int32 bias is held on the input's scale times the weight's, and onnxruntime's
    fused integer kernels read it so)."""
    codec, bias = layer.codec, layer.bias_codec
    if not isinstance(codec, QDQ) or codec.block_size or codec.axis != layer.out_axis:
        return False
    if bias is None:  # a float bias, or none: nothing held on the weight's scales
        return True
    size = int(np.prod(weights[codec.scale].dims))
    return bias.axis == 0 and int(np.prod(weights[bias.scale].dims)) == size \
        and not bias.block_size


@dataclass(frozen=True)
class _Tensors:
    """What reconstruction asks of a model's tensors, found once: the node position making
    each (-1: a graph input), and the shapes whose every dim is known (a value or a name)."""

    made_at: dict[str, int]
    shapes: dict[str, tuple[int | str, ...]]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Tensors:
        graph = model.graph
        made_at = {i.name: -1 for i in graph.input}
        made_at.update((o, i) for i, n in enumerate(graph.node) for o in n.output)
        shapes: dict[str, tuple[int | str, ...]] = {}
        for vi in (*graph.input, *graph.value_info, *graph.output):
            if vi.type.tensor_type.HasField("shape"):
                dims = tuple(value_dims(vi))
                if None not in dims:
                    shapes[vi.name] = cast(tuple[int | str, ...], dims)
        return cls(made_at, shapes)

    def producer(self, tensor: str) -> int:
        """The position of the node making ``tensor``."""
        if self.made_at.get(tensor, -1) < 0:
            raise OptionError(f"reconstruction: the dense model has no tensor '{tensor}'")
        return self.made_at[tensor]


def _joined(layer: _Layer, models: tuple[_Tensors, _Tensors], stop: int) -> _Layer:
    """The layer, fitted through its residual Add (``joined``: see ``_corrected``) when that
    Add is the dense model's next node (``stop``), its two inputs have the same known rank and
    sizes in each model (no broadcast), and the stream exists before the layer in both; else
    fitted alone."""
    alone = replace(layer, residual=None, joined=None)
    if layer.joined is None or layer.residual is None or not CORRECT_RESIDUAL:
        return alone
    dense, pruned = models
    if dense.made_at.get(layer.joined) != stop:
        return alone
    for model, before in ((dense, stop - 1), (pruned, layer.index)):
        if model.made_at.get(layer.residual, before) >= before:
            return alone
        term, stream = model.shapes.get(layer.output), model.shapes.get(layer.residual)
        if term is None or stream is None or len(term) != len(stream) or any(
                a != b for a, b in zip(term, stream) if isinstance(a, int) or isinstance(b, int)):
            return alone  # (named dims may differ in name only: shape inference's unk__N)
    return layer


def _ridge_search(fit: _Normal, val: _Normal, theta0: np.ndarray, start: int
                  ) -> tuple[float | None, np.ndarray | None, float]:
    """The ridge of :data:`RIDGES` whose refit has the least validation error, its weights and
    that error (None, None, inf: no solve succeeded). A walk downhill from ``start``: on this
    log grid the validation error falls, then rises with λ (ResNet-50 on 256 images, all four
    solved in each of its 54 layers: so in every one but the first conv, whose fit is exact to
    1e-14 at any λ), so the walk finds the grid's best, and from the last layer's choice
    (neighbouring layers choose alike) in two or three solves: 120 instead of 216 there, the
    solves 24 → 16 s of a 200 s run. Ties (within 1e-6) go to the smaller λ."""
    tried: dict[int, tuple[float, np.ndarray | None]] = {}

    def error(i: int) -> float:
        if not 0 <= i < len(RIDGES):
            return math.inf
        if i not in tried:
            theta = fit.solve(theta0, RIDGES[i])
            tried[i] = (math.inf if theta is None else val.error(theta), theta)
        return tried[i][0]

    i = min(max(start, 0), len(RIDGES) - 1)
    while True:
        left, here = error(i - 1), error(i)
        if left < math.inf and left <= here * (1 + 1e-6):  # a smaller λ as good: go left
            i -= 1
        elif i + 1 < len(RIDGES) and (here == math.inf  # a failed solve: a larger λ
                                      or error(i + 1) < here * (1 - 1e-6)):
            i += 1
        else:
            break
    err, theta = tried.get(i, (math.inf, None))
    return (RIDGES[i], theta, err) if theta is not None else (None, None, math.inf)


def _weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the model's initializers (held in memory)."""
    return sum(len(i.raw_data) or numpy_helper.to_array(i).nbytes
               for i in model.graph.initializer)


# --- the layers and their least-squares designs ---------------------------------------------

def refits_any(graph: gs.Graph) -> bool:
    """Whether ``graph`` may have a node of a kind :func:`_layers` refits: a Conv, Gemm or
    MatMul whose weight is a float constant or an integer one dequantised, or a MatMulNBits
    with a constant weight."""
    def refittable(node: gs.Node) -> bool:
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if node.op == "MatMulNBits":
            return isinstance(w, gs.Constant) and np.dtype(w.dtype) == np.uint8
        if isinstance(w, gs.Constant):
            return np.dtype(w.dtype) in _REFIT_FLOATS
        quantized = quantized_weight(w)
        return quantized is not None and has_codes(quantized)

    return any(node.op in ("Conv", "Gemm", "MatMul", "MatMulNBits") and refittable(node)
               for node in graph.nodes)


def refitted_tensors(model: onnx.ModelProto) -> list[tuple[str, str | None]]:
    """The initializers :class:`Reconstruction` may refit in ``model``: each layer's weight
    (the stored integers of a dequantised one) and its bias, or None (:func:`_layers`)."""
    return [(layer.weight, layer.bias) for layer in _layers(model)]


@dataclass(frozen=True)
class _Chain:
    """A weight dequantised by plain ops (spa/ir/quant_chain.py): its integers, how they are
    held, and its ops' outputs in order (Cast first)."""

    q: str
    codec: QDQ
    outputs: tuple[str, ...]


def _chains(model: onnx.ModelProto) -> dict[str, _Chain]:
    """The chains of plain ops that dequantise a weight, by the tensor they compute (the one
    place that recognises them, :func:`spa.ir.quant_chain.dequant_chain`, reads the graph)."""
    if not any(n.op_type == "Cast" for n in model.graph.node):
        return {}
    found = {}
    for node in gs.import_onnx(model).nodes:
        if node.op not in ("Mul", "Transpose") or len(node.outputs) != 1:
            continue
        chain = dequant_chain(node.outputs[0])
        if isinstance(chain, DequantChain) and onnx_type(chain.q.dtype) in _INTEGERS:
            zp = chain.zero_point.name if chain.zero_point is not None else None
            found[chain.out.name] = _Chain(chain.q.name, QDQ(chain.scale.name, zp, chain.axis,
                                                             perm=chain.perm),
                                           tuple(n.outputs[0].name for n in chain.nodes))
    return found


def _weights_by_their_layers(model: onnx.ModelProto, chains: Mapping[str, _Chain] | None = None
                             ) -> onnx.ModelProto:
    """``model`` (a copy, when anything moves) with each DequantizeLinear of initializers that
    one node reads moved to just before that node. The pruned model is run up to a layer, the
    layer refitted, and the run goes on from there: a weight dequantised earlier would have
    been held from before the refit, and later layers fitted to what the refit no longer
    computes (a QDQ model's layers, each fitted on the others' old weights)."""
    inits = {i.name for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes = list(model.graph.node)
    movable = {n.output[0]: k for k, n in enumerate(nodes)
               if n.op_type == "DequantizeLinear" and (n.domain or "") in ("", "ai.onnx")
               and len(n.output) == 1 and readers.get(n.output[0]) == 1
               and all(i in inits or not i for i in n.input)}
    made_by = {o: k for k, n in enumerate(nodes) for o in n.output}
    chains = _chains(model) if chains is None else chains
    for out, chain in chains.items():  # a chain's ops, from its Cast on
        if readers.get(out) == 1:
            movable.update((o, made_by[o]) for o in chain.outputs)
    order: list[int] = []
    moving = set(movable.values())

    def emit(k: int) -> None:
        for i in nodes[k].input:
            if i in movable:
                emit(movable[i])
        order.append(k)

    for k in range(len(nodes)):
        if k not in moving:
            emit(k)
    if order == list(range(len(nodes))):
        return model
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    del moved.graph.node[:]
    moved.graph.node.extend(nodes[k] for k in order)
    return moved


def _layers(model: onnx.ModelProto, chains: Mapping[str, _Chain] | None = None
            ) -> list[_Layer]:
    """The refittable nodes, in graph (topological) order: a weight read by this node only (a
    float initializer, an integer one dequantised by a DequantizeLinear, or a MatMulNBits'
    blocks), an optional bias (a float initializer, or dequantised), plain attributes."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def const(name: str, rank: int | None = None) -> bool:
        init = inits.get(name)
        return (init is not None and readers.get(name) == 1
                and onnx.helper.tensor_dtype_to_np_dtype(init.data_type) in _REFIT_FLOATS
                and (rank is None or len(init.dims) == rank))

    dequantized = {n.output[0]: n for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and (n.domain or "") in ("", "ai.onnx")}
    chains = _chains(model) if chains is None else chains

    position = {n.output[0]: i for i, n in enumerate(model.graph.node) if n.output}
    # where a dequantised weight starts being computed: its DequantizeLinear, its chain's Cast
    starts = {name: position[name] for name in dequantized}
    starts.update((name, position[c.outputs[0]]) for name, c in chains.items())

    def weight(name: str, rank: int) -> tuple[str, QDQ | None] | None:
        """The layer's weight: a float initializer, or the integer one a DequantizeLinear (or
        a chain of plain ops) read by this node only dequantises (its name, and how it is
        held)."""
        if const(name, rank):
            return name, None
        chain = chains.get(name)
        if chain is not None and readers.get(name) == 1 and chain.q in inits \
                and len(inits[chain.q].dims) == rank:
            return chain.q, chain.codec
        dq = dequantized.get(name)
        if dq is None or readers.get(name) != 1:
            return None
        codec = _qdq(dq, inits, readers, rank)
        return None if codec is None else (dq.input[0], codec)

    def added_bias(node: onnx.NodeProto, width: int) -> tuple[str | None, str]:
        """The bias of a layer with none of its own: the float constant of ``width`` values
        that the one Add reading its output adds (that Add's output is then the layer's);
        else ``(None, its own output)``."""
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add" and node.output[0] not in outputs:
            other = [n for n in after[0].input if n != node.output[0]]
            if len(other) == 1 and const(other[0], 1) and inits[other[0]].dims[0] == width:
                return other[0], after[0].output[0]
        return None, node.output[0]

    def fed_from(node: onnx.NodeProto, i: int) -> int | None:
        """The first of the nodes dequantising ``node``'s weight or bias (run right before it:
        :func:`_weights_by_their_layers`), or None: nothing dequantised."""
        first = min((starts[n] for n in node.input[1:] if n in starts), default=i)
        return first if first < i else None

    found: list[_Layer] = []
    for i, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        before = len(found)
        if node.op_type == "Conv" and len(node.input) >= 2 \
                and (w := weight(node.input[1], 4)) is not None \
                and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            bias = weight(node.input[2], 1) if len(node.input) > 2 and node.input[2] \
                else (None, None)
            if bias is not None:
                found.append(_Layer(i, node.name, "Conv", w[0], bias[0], node.input[0],
                                    node.output[0], 0, codec=w[1], bias_codec=bias[1],
                                    fed_from=fed_from(node, i)))
        elif node.op_type == "Gemm" and (w := weight(node.input[1], 2)) is not None \
                and not attrs.get("transA", 0) \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            held = (bias, None) if bias is not None and const(bias) else \
                weight(bias, 1) if bias is not None else (None, None)
            if held is not None and (held[0] is None or int(np.prod(inits[held[0]].dims)) == (
                    inits[w[0]].dims[0 if attrs.get("transB", 0) else 1])):
                found.append(_Layer(i, node.name, "Gemm", w[0], held[0], node.input[0],
                                    node.output[0], 0 if attrs.get("transB", 0) else 1,
                                    codec=w[1], bias_codec=held[1],
                                    fed_from=fed_from(node, i)))
        elif node.op_type == "MatMul" and (w := weight(node.input[1], 2)) is not None \
                and node.input[0] not in inits:
            added, output = added_bias(node, inits[w[0]].dims[1])
            found.append(_Layer(i, node.name, "MatMul", w[0], added, node.input[0],
                                output, 1, codec=w[1], fed_from=fed_from(node, i)))
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft" \
                and (codec := _nbits(node, attrs, inits, readers)) is not None:
            own = node.input[5] if len(node.input) > 5 and node.input[5] else None
            added, output = (own, node.output[0]) if own is not None \
                else added_bias(node, int(attrs.get("N", 0)))
            if added is None or const(added, 1):
                found.append(_Layer(i, node.name, "MatMulNBits", node.input[1], added,
                                    node.input[0], output, 0, codec=codec))
        if len(found) == before:
            continue
        stored = found[-1].codec
        if isinstance(stored, QDQ) and stored.perm is not None:  # the axis of the integers
            found[-1] = replace(found[-1], out_axis=stored.perm[found[-1].out_axis])
        after = consumers.get(found[-1].output, [])
        if len(after) == 1 and after[0].op_type == "Add" and found[-1].output not in outputs:
            other = [n for n in after[0].input if n != found[-1].output]
            if len(other) == 1 and other[0] not in inits:
                found[-1] = replace(found[-1], residual=other[0], joined=after[0].output[0])
    return found


#: the float weights refitted in place (a float16 one is fitted in float64, judged as written)
_REFIT_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_INTEGERS = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
             onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.INT4,
             onnx.TensorProto.UINT4)


def _qdq(dq: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
         readers: Mapping[str, int], rank: int) -> QDQ | None:
    """A DequantizeLinear whose weight reconstruction can refit: its integer tensor of
    ``rank``, scale and zero point initializers read by it only, one scale or one per index of
    its axis, or one per block of its axis (opset 21's ``block_size``)."""
    def own(i: int) -> onnx.TensorProto | None:
        name = dq.input[i] if len(dq.input) > i else ""
        init = inits.get(name)
        return init if init is not None and readers.get(name) == 1 else None

    q, scale = own(0), own(1)
    has_zp = len(dq.input) > 2 and bool(dq.input[2])
    zp = own(2) if has_zp else None
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    if q is None or scale is None or q.data_type not in _INTEGERS or len(q.dims) != rank \
            or scale.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) \
            or (has_zp and (zp is None or zp.data_type != q.data_type
                            or list(zp.dims) != list(scale.dims))):
        return None
    block = int(attrs.get("block_size", 0) or 0)
    if block:  # the scale of q's rank, ⌈n / block⌉ on the axis
        axis = int(attrs.get("axis", 1)) % rank
        dims = [-(-d // block) if i == axis else d for i, d in enumerate(q.dims)]
        if list(scale.dims) != dims:
            return None
        return QDQ(scale.name, zp.name if zp is not None else None, axis, block)
    size = int(np.prod(scale.dims, dtype=np.int64))
    if size == 1 and len(scale.dims) <= 1:
        return QDQ(scale.name, zp.name if zp is not None else None, None)
    axis = int(attrs.get("axis", 1))
    if len(scale.dims) != 1 or not -rank <= axis < rank or q.dims[axis % rank] != size:
        return None
    return QDQ(scale.name, zp.name if zp is not None else None, axis % rank)


def _nbits(node: onnx.NodeProto, attrs: dict, inits: Mapping[str, onnx.TensorProto],
           readers: Mapping[str, int]) -> NBits | None:
    """A MatMulNBits whose weight reconstruction can refit: ``B``, its scales and its packed
    zero points (if any) initializers read by this node only, whole blocks, no ``g_idx``."""
    bits, block, k = int(attrs.get("bits", 4)), int(attrs.get("block_size", 0)), \
        int(attrs.get("K", 0))

    def own(i: int, dtypes: tuple[int, ...], rank: int) -> str | None:
        name = node.input[i] if len(node.input) > i else ""
        init = inits.get(name)
        ok = init is not None and readers.get(name) == 1 and init.data_type in dtypes \
            and len(init.dims) == rank
        return name if ok else None

    uint8 = (onnx.TensorProto.UINT8,)
    scales = own(2, (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16), 2)
    has_zp = len(node.input) > 3 and bool(node.input[3])
    zp = own(3, uint8, 2) if has_zp else None
    if own(1, uint8, 3) is None or scales is None or (has_zp and zp is None) \
            or (len(node.input) > 4 and node.input[4]) or attrs.get("weight_prepacked", 0) \
            or bits not in (2, 4, 8) or block <= 0 or k <= 0 or k % block:
        return None
    return NBits(scales, zp, bits, block, k)


@dataclass(frozen=True)
class _Design:
    """How a layer's input becomes least-squares rows: ``groups`` independent problems, each
    with ``features`` inputs (plus a bias column) and ``outputs`` outputs."""

    layer: _Layer
    groups: int
    features: int
    outputs: int
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    trans_b: bool = False

    @classmethod
    def of(cls, layer: _Layer, node: onnx.NodeProto, w: np.ndarray) -> _Design | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if layer.op == "Conv":
            g = int(attrs.get("group", 1))
            cout, cin_g, kh, kw = w.shape
            if cout % g:
                return None
            pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
            return cls(layer, g, cin_g * kh * kw, cout // g, (kh, kw),
                       tuple(attrs.get("strides", (1, 1))),  # type: ignore[arg-type]
                       pads, tuple(attrs.get("dilations", (1, 1))))  # type: ignore[arg-type]
        if layer.op == "Gemm":
            trans = bool(attrs.get("transB", 0))
            k, n = (w.shape[1], w.shape[0]) if trans else w.shape
            return cls(layer, 1, k, n, trans_b=trans)
        return cls(layer, 1, w.shape[0], w.shape[1])

    def rows(self, x: np.ndarray, out_shape: tuple[int, ...], per_sample: int,
             rng: np.random.Generator, valid: np.ndarray | None = None
             ) -> tuple[np.ndarray, Rows, np.ndarray]:
        """Sampled rows ``[R, groups, columns]`` (a last column of ones with a bias), how to
        take the matching target rows ``[R, groups, outputs]`` from a tensor shaped like the
        output (``at(y, kept)``, with the output channels ``kept``, None: all), and the sample
        each row came from. ``valid`` (``[N, positions]``, from the attention mask): token rows
        to sample from; padding says nothing of the layer."""
        if self.layer.op == "Conv":
            return self._conv_rows(x, out_shape, per_sample, rng)
        xr = x.reshape(len(x), -1, x.shape[-1])
        if valid is None or valid.shape != xr.shape[:2]:
            valid = np.ones(xr.shape[:2], dtype=bool)
        picks = [rng.choice(np.flatnonzero(v), min(per_sample, int(v.sum())), replace=False)
                 for v in valid]
        owner = np.repeat(np.arange(len(x)), [len(p) for p in picks])
        pos = np.concatenate(picks) if picks else np.zeros(0, int)
        xs = self._empty_rows(len(owner))
        xs[:, 0, :self.features] = xr[owner, pos]

        def at(y: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
            ys = y.reshape(len(y), -1, y.shape[-1])[owner, pos]
            ys = ys if kept is None else ys[:, kept]
            return ys.astype(np.float64)[:, None, :]
        return xs, at, owner

    @property
    def columns(self) -> int:
        """Unknowns per group and output: the features, and the bias if the layer has one."""
        return self.features + int(self.layer.bias is not None)

    def _empty_rows(self, count: int) -> np.ndarray:
        """Rows ``[count, groups, columns]`` to fill, the bias column already ones."""
        xs = np.empty((count, self.groups, self.columns))
        xs[:, :, self.features:] = 1.0
        return xs

    def _conv_rows(self, x, out_shape, per_sample, rng):
        n, c, h, w_ = x.shape
        ho, wo = out_shape[2], out_shape[3]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        t, left, b, r = self.pads
        take = min(per_sample, ho * wo)
        flat = np.stack([rng.choice(ho * wo, take, replace=False) for _ in range(n)])
        owner = np.repeat(np.arange(n), take)
        oy, ox = np.divmod(flat.reshape(-1), wo)
        xs = self._empty_rows(len(owner))
        if (kh, kw) == (1, 1) and not any(self.pads):
            # a 1×1 conv's row is one pixel's channels: one gather from the NCHW tensor
            # (ResNet-50's bottleneck 1×1s: 5× faster than the channels-last copy below)
            xs[:, :, :self.features] = x[owner, :, oy * sh, ox * sw].reshape(
                len(owner), self.groups, -1)
        else:
            # channels last, padded: each kernel offset's patch column is one gather of whole
            # channel rows (the same values as indexing the NCHW tensor, far fewer cache misses)
            xp = np.zeros((n, h + t + b, w_ + left + r, c), dtype=x.dtype)
            xp[:, t:t + h, left:left + w_] = x.transpose(0, 2, 3, 1)
            cols = xs[:, :, :self.features].reshape(len(owner), self.groups, -1, kh, kw)
            for i in range(kh):
                for j in range(kw):
                    cols[..., i, j] = xp[owner, oy * sh + i * dh, ox * sw + j * dw].reshape(
                        len(owner), self.groups, -1)

        def at(y: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
            ys = y[owner, :, oy, ox]  # [R, C]
            ys = ys if kept is None else ys[:, kept]
            return ys.astype(np.float64).reshape(len(owner), self.groups, -1)
        return xs, at, owner

    def theta(self, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """The weights as ``[groups, features (+1 bias), outputs]``."""
        if self.layer.op == "Conv":
            t = w.reshape(self.groups, self.outputs, self.features).transpose(0, 2, 1)
        else:
            t = (w.T if self.trans_b else w)[None]
        if b is not None:
            t = np.concatenate([t, b.reshape(self.groups, 1, self.outputs)], axis=1)
        return np.ascontiguousarray(t, dtype=np.float64)

    def weights(self, theta: np.ndarray, shape: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray | None]:
        bias = theta[:, self.features, :].reshape(-1) if theta.shape[1] > self.features \
            else None
        t = theta[:, :self.features, :]
        if self.layer.op == "Conv":
            return t.transpose(0, 2, 1).reshape(shape), bias
        w = t[0]
        return (w.T if self.trans_b else w), bias


class _Normal:
    """The normal equations of one layer's rows, per group: ``XᵀX``, ``XᵀY``, ``‖Y‖²``."""

    def __init__(self, design: _Design):
        f = design.columns
        self.gram = np.zeros((design.groups, f, f))
        self.cross = np.zeros((design.groups, f, design.outputs))
        self.energy = 0.0
        self.count = 0

    def add(self, xs: np.ndarray, ys: np.ndarray) -> None:
        """Rows ``xs`` (with their bias column of ones when the layer has a bias)."""
        if not len(xs):
            return
        xt = xs.transpose(1, 2, 0)  # [groups, features, rows]: one BLAS product per group
        self.gram += xt @ xs.transpose(1, 0, 2)
        self.cross += xt @ ys.transpose(1, 0, 2)
        self.energy += float(np.vdot(ys, ys))  # (no squared copy of the rows)
        self.count += len(xs)

    def error(self, theta: np.ndarray) -> float:
        """``‖XΘ − Y‖² / ‖Y‖²`` from the accumulated sums."""
        sq = float(np.sum(theta * (self.gram @ theta))) \
            - 2 * float(np.sum(theta * self.cross)) + self.energy
        return float(max(sq, 0.0) / max(self.energy, 1e-30))

    def solve(self, theta0: np.ndarray, ridge: float) -> np.ndarray | None:
        """``(XᵀX + λI)⁻¹ (XᵀY + λΘ₀)`` per group, λ relative to the mean diagonal."""
        scale = np.einsum("gii->g", self.gram) / self.gram.shape[1]
        lam = ridge * np.maximum(scale, 1e-12)[:, None, None]
        damped = self.gram.copy()
        np.einsum("gii->gi", damped)[...] += lam[:, :, 0]  # λ on the diagonal
        try:
            return np.linalg.solve(damped, self.cross + lam * theta0)
        except np.linalg.LinAlgError:
            return None
