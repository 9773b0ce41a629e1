"""Calibration inputs synthesised from the dense model itself (model inversion), for data-free
pruning.

Image inputs (float ``[N, C≤4, H, W]``) start as natural-image noise (``1/f²`` spectrum,
:func:`spa.passes.hessian.natural_images`) and are optimised with Adam through the model
(:func:`spa.torch.from_onnx`) on a sum of terms:

* **BatchNorm matching** (DeepInversion, Yin et al. 2020), when the graph has
  BatchNormalization nodes: each BN input's per-channel batch mean and variance against the
  node's running statistics, ``Σ ‖μ_b − μ_run‖₂ + ‖σ²_b − σ²_run‖₂``;
* **activation matching** (BN folded into the convs, as exported files usually are): the
  folded running statistics are not identifiable from the weights (a folded conv's output has
  per-channel mean β and std ``|γ|`` on real data, and β, γ are mixed into its bias and scale),
  so each conv output's per-channel batch statistics are pulled towards *running* statistics
  that the synthetic batches themselves induce: an EMA over the optimisation, started from the
  natural-noise statistics. Mini-batches are cycled, so every batch is pushed towards the
  statistics of the whole set (diverse, but no batch drifts off on its own);
* a **class term** when the first output looks like class scores (``[N, K]``, K ≥ 2):
  cross-entropy towards targets drawn evenly over the K classes (so the set covers them);
* **image priors**: total variation (squared neighbour differences) and an l2 penalty, each
  relative to the starting noise's own, with random jitter (a circular shift of up to 1/16 of
  the side) at every step.

Which terms run is the *method* (:class:`Method`); ``auto`` picks ``batchnorm`` when the graph
has BN statistics and ``classes`` otherwise — the choice measured best on folded models
(benchmarks/quality/inversion.py; results/inversion.json). Non-image inputs cannot be inverted
by gradients: integer ids are drawn uniformly over the rows of the embedding table that
gathers them (else over ``[0, 1000)``), other floats from a standard normal; the returned
:class:`Synthesis` says so.

Cost. The work is ``steps × samples × pixels`` forward-backward passes: ``steps`` defaults to
:data:`STEPS` (200) for inputs up to 64×64 pixels and falls in proportion to the pixel count
above that (never under :data:`MIN_STEPS`); images above 64×64 are optimised at half the
resolution for the first 3/4 of the steps (natural images are smooth, and this is 4× cheaper),
then at full resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from spa.calibration.text import ID_RANGE
from spa.errors import OptionError
from spa.passes.hessian import natural_images
from spa.torch.interpreter import Answer, in_chunks

log = logging.getLogger(__name__)

STEPS = 200
MIN_STEPS = 40
BATCH = 32  # samples per optimisation step (mini-batches cycle over the set)
SMALL = 64 * 64  # pixels up to which the full step count runs at full resolution


class Method(str, Enum):
    """How image inputs are synthesised."""

    AUTO = "auto"
    BATCHNORM = "batchnorm"
    ACTIVATIONS = "activations"
    CLASSES = "classes"
    NOISE = "noise"


@dataclass(frozen=True)
class Synthesis:
    """Synthetic inputs named after the graph inputs (first axis: samples) and how they were
    made: ``method`` is a :class:`Method` value, or ``random`` when no input is an image."""

    arrays: dict[str, np.ndarray]
    method: str
    detail: str


@dataclass(frozen=True)
class Weights:
    """Weights of the loss terms. The priors' were measured on the digits ResNet (OBSPA at 2×
    FLOPs, two seeds): TV 1.0 gave 0.82–0.86 test accuracy, 0.01 gave 0.73–0.79, 3 and 10
    no better than 1 (benchmarks/quality/inversion.py)."""

    stats: float = 1.0
    classes: float = 1.0
    tv: float = 1.0
    l2: float = 1e-2


def synthesize(model: onnx.ModelProto | str | Path, samples: int, *,
               dims: dict[str, int] | None = None, seed: int = 0, steps: int | None = None,
               method: str = "auto", weights: Weights = Weights()) -> Synthesis:
    """``samples`` inputs for ``model`` by inversion (module docstring); symbolic dims take
    their size from ``dims`` (by dim name), else 1."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    try:
        chosen = Method(method)
    except ValueError:
        raise OptionError(f"unknown inversion method {method!r}; choose from "
                          f"{', '.join(m.value for m in Method)}") from None
    if samples < 1:
        raise OptionError(f"synthesize needs at least one sample, not {samples}")
    rng = np.random.default_rng(seed)
    shapes = _input_shapes(proto, samples, dims or {})
    images = [n for n, (shape, dtype) in shapes.items() if _is_image(shape, dtype)]
    arrays, notes = {}, []
    for name, (shape, dtype) in shapes.items():
        if name not in images:
            arrays[name], note = _draw(proto, name, shape, dtype, rng)
            notes.append(note)
    if not images:
        return Synthesis(arrays, "random", "; ".join(notes) + " (no image input to invert)")
    has_bn = any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if chosen is Method.AUTO:
        chosen = Method.BATCHNORM if has_bn else Method.CLASSES
    if chosen is Method.BATCHNORM and not has_bn:
        raise OptionError("inversion method 'batchnorm' needs BatchNormalization nodes; this "
                          "model has none (folded): use 'activations', 'classes' or 'auto'")
    start = {n: natural_images(shapes[n][0], rng) for n in images}
    if chosen is Method.NOISE:
        arrays.update({n: v.astype(shapes[n][1]) for n, v in start.items()})
        notes.insert(0, f"{', '.join(images)}: natural-image noise (1/f² spectrum)")
        return Synthesis(arrays, chosen.value, "; ".join(notes))
    torch.manual_seed(seed)
    inverted, detail = _invert(proto, start, arrays, chosen, steps, weights, rng)
    arrays.update({n: v.astype(shapes[n][1]) for n, v in inverted.items()})
    return Synthesis(arrays, chosen.value, "; ".join([detail, *notes]))


def _input_shapes(proto: onnx.ModelProto, samples: int, dims: dict[str, int]
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each graph input's shape (batch axis = ``samples``) and numpy dtype."""
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                 else dims.get(d.dim_param, 1) for d in t.shape.dim]
        if shape:
            shape[0] = samples
        out[value.name] = (tuple(shape), helper.tensor_dtype_to_np_dtype(t.elem_type))
    return out


def _is_image(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return len(shape) == 4 and np.issubdtype(dtype, np.floating) and shape[1] <= 4 \
        and min(shape[2:]) >= 8


def _draw(proto: onnx.ModelProto, name: str, shape: tuple[int, ...], dtype: np.dtype,
          rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Seeded random values for an input gradients cannot shape, and how they were drawn."""
    if np.issubdtype(dtype, np.integer):
        rows = embedding_rows(proto, name)
        high = rows or ID_RANGE
        where = f"the {rows} rows of its embedding table" if rows else f"[0, {ID_RANGE})"
        return (rng.integers(0, high, size=shape).astype(dtype),
                f"{name}: random ids uniform over {where}")
    if dtype == np.bool_:
        return np.ones(shape, dtype), f"{name}: all true (a mask)"
    return (rng.standard_normal(shape).astype(dtype),
            f"{name}: standard normal (not an image, not invertible)")


def embedding_rows(proto: onnx.ModelProto, name: str) -> int | None:
    """The row count of the initializer a Gather indexes with ``name`` (axis 0), if any."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name \
                and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis == 0:
                return int(inits[node.input[0]].dims[0])
    return None


def _taps(proto: onnx.ModelProto, method: Method) -> list[tuple[str, tuple[str, str] | None]]:
    """The tensors whose per-channel statistics the method matches, each with the names of its
    running mean and variance (BN) or None (statistics of the set itself)."""
    if method is Method.BATCHNORM:
        return [(n.input[0], (n.input[3], n.input[4])) for n in proto.graph.node
                if n.op_type == "BatchNormalization"]
    if method is Method.ACTIVATIONS:
        return [(n.output[0], None) for n in proto.graph.node if n.op_type == "Conv"]
    return []


def _invert(proto: onnx.ModelProto, start: dict[str, np.ndarray],
            fixed: dict[str, np.ndarray], method: Method, steps: int | None,
            weights: Weights, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], str]:
    """Adam on the image inputs from ``start``; the other inputs stay ``fixed``."""
    from spa.torch.interpreter import from_onnx, with_outputs

    taps = _taps(proto, method)
    module = from_onnx(with_outputs(proto, [t for t, _ in taps]))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    n_out = len(proto.graph.output)
    first = next(iter(start.values()))
    samples, pixels = first.shape[0], int(np.prod(first.shape[2:]))
    total = steps if steps is not None else max(MIN_STEPS, min(STEPS, STEPS * SMALL // pixels))
    coarse = total * 3 // 4 if pixels > SMALL else 0
    images = {n: torch.from_numpy(v.astype(np.float32)) for n, v in start.items()}
    priors = {n: (_tv(x).detach(), x.pow(2).mean().detach()) for n, x in images.items()}
    targets, classes = _targets(module, images, fixed, samples, rng) if weights.classes \
        else (None, 0)
    running = _running(module, taps, images, fixed, n_out)
    order = rng.permutation(samples)
    batches = [order[i:i + BATCH] for i in range(0, samples, BATCH)]
    state = {n: (F.avg_pool2d(x, 2) if coarse else x).clone().requires_grad_(True)
             for n, x in images.items()}
    opt = torch.optim.Adam(list(state.values()), lr=0.1, betas=(0.5, 0.9))
    last = {}
    for step in range(total):
        if step == coarse and coarse:
            state = {n: F.interpolate(x.detach(), size=images[n].shape[2:], mode="bilinear",
                                      align_corners=False).requires_grad_(True)
                     for n, x in state.items()}
            opt = torch.optim.Adam(list(state.values()), lr=0.05, betas=(0.5, 0.9))
        rows = torch.from_numpy(batches[step % len(batches)])
        feeds = {n: _jitter(_full(x[rows], images[n].shape[2:]), rng) for n, x in state.items()}
        outs = _run(module, feeds, fixed, rows)
        terms = _priors(feeds, priors, weights)
        if targets is not None:
            terms["classes"] = weights.classes * F.cross_entropy(outs[0], targets[rows])
        if taps:
            terms["stats"] = weights.stats * _stats_loss(outs[n_out:], taps, running, module)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        last = {k: float(v.detach()) for k, v in terms.items()}
    result = {n: _full(x.detach(), images[n].shape[2:]).numpy() for n, x in state.items()}
    how = {Method.BATCHNORM: f"DeepInversion: {len(taps)} BatchNorm inputs matched to their "
                             "running statistics",
           Method.ACTIVATIONS: f"{len(taps)} conv outputs matched to the set's running "
                               "statistics",
           Method.CLASSES: "class-conditional inversion"}[method]
    term = f", cross-entropy to random targets among {classes} classes" \
        if targets is not None else ", no class term"
    return result, (f"{', '.join(start)}: {how}{term}, TV and l2 priors; {total} Adam steps "
                    f"from natural-image noise{' (3/4 at half resolution)' if coarse else ''}; "
                    f"final terms {', '.join(f'{k}={v:.3g}' for k, v in last.items())}")


def _full(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return x if x.shape[2:] == size else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                       align_corners=False)


def _run(module, feeds: dict[str, torch.Tensor], fixed: dict[str, np.ndarray],
         rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    args = [feeds[n] if n in feeds else torch.from_numpy(fixed[n][rows.numpy()])
            for n in module.input_names]

    def run(part: list[torch.Tensor]) -> Answer:
        out = module(*part)
        return (out if isinstance(out, tuple) else (out,)), {}
    return in_chunks(run, args, module.fixed_batch)[0]  # a fixed-batch export: in chunks


def _targets(module, images: dict[str, torch.Tensor], fixed: dict[str, np.ndarray],
             samples: int, rng: np.random.Generator) -> tuple[torch.Tensor | None, int]:
    """Target classes for an ``[N, K]`` first output: distinct random classes while N ≤ K, each
    class equally often beyond; (None, 0) when the output does not look like class scores."""
    with torch.no_grad():
        rows = torch.arange(min(samples, 2))
        out = _run(module, {n: x[rows] for n, x in images.items()}, fixed, rows)[0]
    if out.dim() != 2 or out.shape[1] < 2 or not out.is_floating_point():
        return None, 0
    k = out.shape[1]
    return torch.from_numpy(rng.permutation(k)[np.arange(samples) % k]).long(), k


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


def _running(module, taps, images, fixed, n_out: int) -> list[list[torch.Tensor]]:
    """Per tap: [mean, var] targets — the BN running statistics, or the starting noise's."""
    if not taps:
        return []
    tensors = module.onnx_tensors()
    if taps[0][1] is not None:
        return [[tensors[m].float(), tensors[v].float()] for _, (m, v) in taps]  # type: ignore
    with torch.no_grad():
        rows = torch.arange(min(BATCH, next(iter(images.values())).shape[0]))
        outs = _run(module, {n: x[rows] for n, x in images.items()}, fixed, rows)
    return [list(_channel_stats(o)) for o in outs[n_out:]]


def _stats_loss(acts, taps, running: list[list[torch.Tensor]], module, momentum: float = 0.9
                ) -> torch.Tensor:
    """Σ over taps of the batch statistics' distance to the running ones (DeepInversion's
    norm distances, the variance compared through its square root so that wide- and
    narrow-range channels weigh alike); the set's own running statistics follow an EMA."""
    loss = torch.zeros(())
    for a, (_, bn), run in zip(acts, taps, running):
        mean, var = _channel_stats(a)
        if bn is not None:
            loss = loss + torch.norm(mean - run[0]) + torch.norm(var - run[1])
            continue
        scale = run[1].sqrt() + 1e-3
        loss = loss + ((mean - run[0]) / scale).pow(2).mean() \
            + (var.sqrt() / scale - 1).pow(2).mean()
        run[0] = momentum * run[0] + (1 - momentum) * mean.detach()
        run[1] = momentum * run[1] + (1 - momentum) * var.detach()
    return loss / max(len(acts), 1)


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() \
        + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def _priors(feeds: dict[str, torch.Tensor], start: dict[str, tuple[torch.Tensor, torch.Tensor]],
            weights: Weights) -> dict[str, torch.Tensor]:
    """Total variation and l2, each relative to the starting noise's (so 1 = as rough/large as
    natural noise), summed over the image inputs."""
    tv = sum((_tv(x) / start[n][0] for n, x in feeds.items()), torch.zeros(()))
    l2 = sum((x.pow(2).mean() / start[n][1] for n, x in feeds.items()), torch.zeros(()))
    return {"tv": weights.tv * tv, "l2": weights.l2 * l2}


def _jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random circular shift of up to 1/16 of each side (DeepInversion's jitter)."""
    dy, dx = (int(rng.integers(-(s // 16), s // 16 + 1)) for s in x.shape[2:])
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
