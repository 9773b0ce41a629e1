"""Layer-input second moments ``H = X Xᵀ`` for OBS, from data or data-free sources.

A *consumer layer* is a node that reads a pruned channel through a weight's input axis, of an
op whose registry entry has a layer-input accessor (spa/coupling/facts.py: Conv, ConvTranspose,
Gemm, MatMul). Its ``H`` is over the channels of that axis: the activation ``X``
feeding it, channel axis last, every other axis (batch, spatial, sequence) a sample. For convs
this treats kernel positions as independent rows of the weight (``H ⊗ I``), the usual structured
approximation. Sources (``--hessian``):

* ``calibration``: real inputs (``--calib FILE.npz``, arrays named after the graph inputs); in
  a model with an attention-mask input, the rows at padding tokens are left out
  (:func:`spa.calibration.real_rows`): fortunes padded to 128 tokens are five sixths padding,
  and all-MiniLM-L6-v2's ``H`` was mostly theirs (heads + MLP 0.3, held-out cosine 0.9351 →
  0.9399); when every input is a token tensor, batches are made of samples of similar length
  and cut after their last attended column (:func:`spa.calibration.chunked`);
* ``synthetic`` (default, no data): seeded random inputs shaped like the graph inputs. Image
  inputs (``[N, C≤4, H, W]`` floats) get *natural-image-like* noise: a power spectrum falling as
  ``1/f²`` (as photographs do), channels strongly correlated (as RGB is), standardised per
  channel like normalised photos; other float inputs get standard normal values;
* ``noise``: white standard-normal noise for every float input (the baseline DESIGN.md measured
  as useless — kept to measure against);
* ``identity``: ``H = I`` — OBS then degenerates to the consumer columns' L2 norm, no update.

All layers' inputs are collected in one onnxruntime pass per sample batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.choices import HessianSource
from spa.coupling.facts import LayerInput
from spa.coupling.registry import entry_of
from spa.coupling.types import Role
from spa.errors import OptionError
from spa.ir.quant import is_weight
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis

log = logging.getLogger(__name__)
MAX_DENSE = 4096  # above this many input channels a layer uses a diagonal H (memory, time)


@dataclass(frozen=True)
class Use:
    """A node reading a consumer layer's weight, and where its input is."""

    data: str
    data_axis: int
    node: str


@dataclass(frozen=True)
class ConsumerLayer:
    """A weight whose input axis ``axis`` reads channel ``i`` of ``data``'s axis ``data_axis``;
    with ``per`` > 1, index ``i`` of the axis reads channels ``i·per … (i+1)·per − 1`` (a
    ``MatMulNBits``' quantisation block). ``width``: ``data``'s channels, ``H``'s size.
    ``also``: the other nodes reading the same weight (ALBERT's layers share theirs); the
    statistics sum over every use, as the weight's one update must serve them all."""

    weight: str
    axis: int
    data: str
    data_axis: int
    width: int
    node: str
    per: int = 1
    also: tuple[Use, ...] = ()

    @property
    def uses(self) -> tuple[Use, ...]:
        return (Use(self.data, self.data_axis, self.node), *self.also)


def consumer_layers(analysis: Analysis) -> dict[tuple[str, int], ConsumerLayer]:
    """Every consumer weight space of a prunable group whose node SPA can read an input from."""
    spaces = {m.space for g in analysis.prunable_groups for m in g.members
              if m.role is Role.CONSUMER}
    layers: dict[tuple[str, int], ConsumerLayer] = {}
    opset = analysis.model.opset
    for node in analysis.model.graph.nodes:
        for slot, t in enumerate(node.inputs):
            for axis in range(len(t.shape or ())) if is_weight(t) else ():  # or quantised
                if (t.name, axis) in spaces:
                    layer = _layer_of(node, opset, slot, t, axis)
                    if layer is None:
                        continue
                    first = layers.get((t.name, axis))
                    if first is None:
                        layers[(t.name, axis)] = layer
                    elif (first.width, first.per) == (layer.width, layer.per):
                        layers[(t.name, axis)] = replace(first, also=(*first.also, *layer.uses))
    return layers


def _layer_of(node: gs.Node, opset: int, slot: int, w: gs.Tensor, axis: int
              ) -> ConsumerLayer | None:
    """The layer whose weight ``w`` is the node's input ``slot``, read from the op's registry
    entry; None when the op has no layer-input accessor or ``slot`` is not its weight."""
    entry = entry_of(node, opset)
    found = None if entry is None or entry.layer_input is None else entry.layer_input(node, slot)
    if found is None:
        return None
    data, data_axis, per = LayerInput(*found)
    return ConsumerLayer(w.name, axis, data.name, data_axis, w.shape[axis] * per, node.name, per)


@dataclass
class InputStats:
    """Per-channel statistics of one consumer layer's input, summed over samples (and over
    the uses of a shared weight; ``by_use``: each use's count and ``Σ x`` then, by node)."""

    n: int
    total: np.ndarray  # Σ x
    total_abs: np.ndarray  # Σ |x|
    gram: np.ndarray  # Σ x xᵀ (or Σ x² when the layer is too wide for a dense matrix)
    by_use: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.n, 1)

    def means(self, layer: ConsumerLayer) -> dict[str, np.ndarray]:
        """The input's mean at each node using the layer's weight."""
        if not self.by_use:
            return {layer.node: self.mean}
        return {node: total / max(n, 1) for node, (n, total) in self.by_use.items()}

    def copy(self) -> InputStats:
        return InputStats(self.n, self.total.copy(), self.total_abs.copy(), self.gram.copy(),
                          {k: (n, t.copy()) for k, (n, t) in self.by_use.items()})

    def add(self, n: int, total: np.ndarray, total_abs: np.ndarray, gram: np.ndarray) -> None:
        self.n += n
        self.total += total
        self.total_abs += total_abs
        self.gram += gram

    @property
    def second_moment(self) -> np.ndarray:
        """``H = E[x xᵀ]`` (diagonal vector for very wide layers)."""
        return self.gram / max(self.n, 1)

    @property
    def variance(self) -> np.ndarray:
        diag = self.second_moment if self.gram.ndim == 1 else np.diag(self.second_moment)
        return np.maximum(diag - self.mean**2, 0)


def input_stats(analysis: Analysis, layers: dict[tuple[str, int], ConsumerLayer],
                source: HessianSource, *, samples: int, seed: int = 0,
                calib: dict[str, np.ndarray] | None = None, dims: dict[str, int] | None = None,
                skip_padding: bool = True, keep_fitted: bool = False) -> Split:
    """Statistics of every layer's input over the source's samples, one onnxruntime pass each
    (``samples``: how many synthetic batches; calibration data is read whole). With
    ``keep_fitted`` and a free batch axis, also the same without the calibration data's
    validation runs: their batches come last (:func:`_batches`), and the sums are copied as
    the first of them arrives. The analysis pass that runs this is passes/statistics.py."""
    from spa import validate as val
    from spa.calibration import attention_mask, padding_cut
    from spa.ir import to_onnx
    from spa.ir.save import TWO_GB, graph_bytes
    from spa.ir.widen import uses_bfloat16, widened

    size = graph_bytes(analysis.model.graph)
    if size >= TWO_GB:  # checked before reading every weight into one protobuf
        raise OptionError(f"layer inputs are collected with onnxruntime from an in-memory copy, "
                          f"which takes models up to 2 GB; this one holds {size / 1e9:.1f} GB "
                          "of weights: use a data-free magnitude criterion (l1, l2, fpgm, lamp)")
    model = to_onnx(analysis.model)
    wanted = sorted({use.data for layer in layers.values() for use in layer.uses})
    present = {o.name for o in model.graph.output}
    # untyped: onnxruntime takes each at its own type (a float16 model's are float16)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n)
                              for n in wanted if n not in present)
    if uses_bfloat16(analysis.model.graph):  # no bfloat16 kernels in onnxruntime's CPU
        model = widened(model)
    sess = val.session(model)
    stats: dict[tuple[str, int], InputStats] = {}
    fitted: dict[tuple[str, int], InputStats] | None = None
    total = None if source is HessianSource.CALIBRATION else samples
    calibrated = source is HessianSource.CALIBRATION and skip_padding
    mask = attention_mask(model) if calibrated else None
    fixed_batch = isinstance(sess.get_inputs()[0].shape[0], int)
    cut = padding_cut(model, calib) if calibrated and not fixed_batch else None
    for part, feeds in progress(_batches(sess, source, samples, seed, calib, dims, cut),
                                "hessians", total, unit="batch"):
        if part == 1 and keep_fitted and fitted is None:  # the fitted samples' sums are done
            fitted = {key: s.copy() for key, s in stats.items()}
        outs = val.run(sess, feeds)
        real = None if mask is None or mask not in feeds else np.asarray(feeds[mask]) != 0
        # layers reading the same input (q, k and v; a ResNet stage's first conv and its
        # shortcut) share one batch's sums: computed once per input
        sums: dict[tuple[str, int, bool], tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        for key, layer in layers.items():
            for use in layer.uses:
                site = (use.data, use.data_axis, layer.width > MAX_DENSE)
                if site not in sums:
                    sums[site] = _sums(outs[use.data], use.data_axis, real, site[2])
                n, total_, total_abs, gram = sums[site]
                s = stats.get(key)
                if s is None:  # copies: each layer's sums grow on their own
                    s = stats[key] = InputStats(n, total_.copy(), total_abs.copy(), gram.copy())
                else:
                    s.add(n, total_, total_abs, gram)
                if layer.also:
                    seen, summed = s.by_use.get(use.node, (0, np.zeros_like(total_)))
                    s.by_use[use.node] = (seen + n, summed + total_)
    return Split(stats, fitted)


@dataclass(frozen=True)
class Split:
    """Statistics over all the samples, and over the fitted ones alone (without the
    validation runs, :func:`spa.calibration.validation_runs`; None: not split)."""

    whole: dict[tuple[str, int], InputStats]
    fitted: dict[tuple[str, int], InputStats] | None


def _sums(value: np.ndarray, axis: int, real: np.ndarray | None, diagonal: bool
          ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One batch of a layer input as rows of channels (``axis``), in float64 (cast after
    the rows are gathered, one copy): their count, ``Σ x``, ``Σ |x|`` and ``Σ x xᵀ`` (``Σ x²``
    when ``diagonal``)."""
    from spa.calibration import real_rows

    x = real_rows(np.moveaxis(np.asarray(value), axis, -1), real).astype(np.float64, copy=False)
    gram = np.einsum("ij,ij->j", x, x) if diagonal else x.T @ x
    return x.shape[0], x.sum(0), np.abs(x).sum(0), gram


def _batches(sess, source: HessianSource, samples: int, seed: int,
             calib: dict[str, np.ndarray] | None, dims: dict[str, int] | None = None,
             cut: str | None = None):
    """``(part, feeds)`` a batch at a time; ``cut``: the attention mask by which calibration
    batches are made of samples of similar length and cut (:func:`spa.calibration.chunked`).
    With a free batch axis, calibration batches are each of one part, the samples fitted (0)
    first, then the validation runs (1, :func:`spa.calibration.validation_runs`), whether or
    not the pass keeps the fitted part's statistics apart (the sensitivity fits its
    compensation on them and judges it on the runs): the whole set's sums are added in one
    order, so ``spa apply``, which does not keep them, writes the same bytes."""
    from spa import validate as val
    from spa.calibration import chunked, validation_runs

    if source is HessianSource.CALIBRATION:
        if not calib:
            raise OptionError("--hessian calibration needs --calib FILE.npz")
        names = [i.name for i in sess.get_inputs()]
        calib = _checked_calibration(sess, calib)
        batch = sess.get_inputs()[0].shape[0]
        step = batch if isinstance(batch, int) and batch > 0 else 8
        n = len(calib[names[0]])
        if n < step:
            raise OptionError(f"calibration data has {n} samples, fewer than the model's "
                              f"batch size {step}")
        whole = {k: calib[k][:n - n % step] for k in names}  # full batches only
        if step == batch:  # a fixed batch: parts would not fill batches
            for chunk in chunked(whole, step, cut)[1]:
                yield 0, chunk
            return
        runs = validation_runs(n)[:n - n % step]
        for part, pick in ((0, ~runs), (1, runs)):
            for chunk in chunked({k: v[pick] for k, v in whole.items()}, step, cut)[1]:
                yield part, chunk
        return
    for i in range(samples):
        feeds = val.random_inputs(sess, seed=seed * 100_003 + i, dims=dims)
        if source is HessianSource.SYNTHETIC:
            rng = np.random.default_rng([seed, i, 7])
            feeds = {k: natural_images(v.shape, rng).astype(v.dtype) if _is_image(v) else v
                     for k, v in feeds.items()}
        yield 0, feeds


def _checked_calibration(sess, calib: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays for the session's inputs, checked and cast by :func:`spa.calibration.fitted`
    (the pipeline's calibration data already was; a caller of this pass may give raw arrays),
    with one sample count."""
    from types import SimpleNamespace

    from spa.calibration import fitted
    from spa.validate import ORT_TYPES

    specs = [SimpleNamespace(name=i.name, dtype=ORT_TYPES.get(i.type), shape=i.shape)
             for i in sess.get_inputs()]
    out = {k: v for k, v in fitted(calib, specs).items() if k in {i.name for i in specs}}
    counts = {len(v) for v in out.values()}
    if len(counts) > 1:
        raise OptionError(f"calibration arrays have different sample counts {sorted(counts)}")
    return out


def _is_image(v: np.ndarray) -> bool:
    return v.ndim == 4 and np.issubdtype(v.dtype, np.floating) and v.shape[1] <= 4 \
        and min(v.shape[2:]) >= 8


def natural_images(shape: tuple[int, ...], rng: np.random.Generator,
                   correlation: float = 0.9) -> np.ndarray:
    """Random images with a ``1/f²`` power spectrum and correlated channels, standardised."""
    n, c, h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    amplitude = 1.0 / np.maximum(np.sqrt(fx**2 + fy**2), 1.0 / max(h, w))

    def field() -> np.ndarray:
        noise = rng.standard_normal((2, n, h, w))
        spectrum = amplitude * (noise[0] + 1j * noise[1])
        return np.fft.ifft2(spectrum).real

    shared = field()
    out = np.stack([correlation * shared + np.sqrt(1 - correlation**2) * field()
                    for _ in range(c)], axis=1)
    out -= out.mean(axis=(0, 2, 3), keepdims=True)
    return out / (out.std(axis=(0, 2, 3), keepdims=True) + 1e-12)


def damped_inverse(h: np.ndarray, damping: float) -> np.ndarray:
    """``(H + λI)⁻¹`` with ``λ = damping · mean(diag H)``, by Cholesky with growing jitter."""
    if h.ndim == 1:
        return 1.0 / (h + damping * h.mean() + 1e-12)
    lam = damping * float(np.mean(np.diag(h))) + 1e-12
    eye = np.eye(h.shape[0])
    for _ in range(8):
        try:
            ci = np.linalg.inv(np.linalg.cholesky(h + lam * eye))  # float64 throughout
            return ci.T @ ci
        except np.linalg.LinAlgError:
            lam *= 10
    raise OptionError("the layer Hessian is not positive definite even with heavy damping")
