"""Running an ONNX graph forward a segment at a time, over chunks of samples.

Reconstruction (passes/reconstruction.py) needs, layer after layer, the pruned model's input to
a layer *after* every earlier layer was refitted, and the dense model's output there. Running
whole models per layer would cost a pass per layer; instead each model is cut into segments at
the layers, and each segment runs in onnxruntime from the tensors live at its start (the
*frontier*), for every chunk of samples. The frontiers stay in memory up to a byte budget and
are spilled to a temporary directory beyond it (removed on exit).
"""

from __future__ import annotations

import logging
import mmap
import shutil
import tempfile
import weakref
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from spa.errors import OptionError, SpillError, ValidationError
from spa.ir.load import with_contrib_shapes

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
#: the types of outputs written into arrays of our own (Frontiers.buffer)
_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})


def with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every tensor's element type known (for segment inputs), contrib ops'
    outputs (an onnxruntime-genai decoder's GroupQueryAttention) included."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types of graph inputs/outputs suffice in most models
        return model
    return with_contrib_shapes(model)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The first graph input's fixed first dim (the samples the model takes at a time)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim[:1] if model.graph.input else []
    return dims[0].dim_value if dims and dims[0].dim_value > 0 else None


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """Every outer tensor a node reads, through its subgraphs too."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {i.name for i in g.input} | {i.name for i in g.initializer}
            for sub in g.node:
                inner |= set(sub.output)
            for sub in g.node:
                names |= node_inputs(sub) - inner
            names |= {o.name for o in g.output} - inner
    return names


def _amount(nbytes: int) -> str:
    """``nbytes`` for a person: 3.2 MiB, 512 KiB, 40 bytes."""
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes >> 10} KiB" if nbytes >= 1 << 10 else f"{nbytes} bytes"


class Frontiers:
    """Per-chunk tensors held between segments; beyond ``memory`` bytes, spilled to disk.

    The arrays it hands out for onnxruntime to write a segment's outputs into
    (:meth:`buffer`) come back when their tensors are released, and are handed out again for
    the next tensor of the same shape: onnxruntime writes into pages already mapped, where
    copying each output out of its arena into a fresh array cost ResNet-50's reconstruction
    about 8 s (the free arrays count against ``memory`` as held ones do, and go first when a
    tensor needs the room)."""

    def __init__(self, memory: int, budget: str = ""):
        self.memory, self.held = memory, 0
        self.budget = budget  # the option that sets ``memory``, named when spilling fails
        self.dir: Path | None = None
        self.count = 0
        self.spilled: list[weakref.ref[np.ndarray]] = []
        self.free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self.pooled = 0  # bytes of the free arrays
        self.mine: dict[int, weakref.ref[np.ndarray]] = {}  # arrays handed out by buffer()

    def __enter__(self) -> Frontiers:
        return self

    def __exit__(self, *exc) -> None:
        self.drop_free()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """An array to write a new tensor into (then :meth:`keep` it): a free one of this
        shape, else a new one while the budget holds it; None: none fits (onnxruntime
        allocates the output itself, and :meth:`keep` spills it)."""
        key = (tuple(shape), np.dtype(dtype).str)
        free = self.free.get(key)
        if free:
            array = free.pop()
            self.pooled -= array.nbytes
            return array
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self.held + nbytes > self.memory:
            return None
        if self.held + self.pooled + nbytes > self.memory:
            self.drop_free()
        array = np.empty(shape, dtype)
        self.mine[id(array)] = weakref.ref(array)
        return array

    def keep(self, value: np.ndarray, *, own: bool = False) -> np.ndarray:
        """``value``, held in memory while the budget allows, else spilled to disk and mapped.
        ``own``: ``value`` is a view of memory it must not hold on to (an onnxruntime output
        lives in its session's arena and would keep the arena's region alive): a value held
        in memory is copied (a spilled one is written out anyway)."""
        if self.held + self.pooled + value.nbytes > self.memory:
            self.drop_free()
        if self.held + value.nbytes <= self.memory:
            self.held += value.nbytes
            return value.copy() if own and not value.flags.owndata else value
        try:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="spa-reconstruction-"))
                log.info("reconstruction spills activations beyond %d MiB to %s",
                         self.memory >> 20, self.dir)
            path = self.dir / f"{self.count}.npy"
            self.count += 1
            np.save(path, value)
        except OSError as exc:
            raise self._spill_failed(exc, value.nbytes) from exc
        self.recycle(value)
        mapped = np.load(path, mmap_mode="r")
        self.spilled.append(weakref.ref(mapped))
        return mapped

    def _spill_failed(self, exc: OSError, nbytes: int) -> SpillError:
        where = self.dir if self.dir is not None else Path(tempfile.gettempdir())
        more = f", or raise {self.budget} to hold more in memory" if self.budget else ""
        return SpillError(
            f"activations beyond {_amount(self.memory)} are spilled to disk, and writing "
            f"{_amount(nbytes)} more to {where} failed ({exc.strerror or exc}): free space "
            f"there or point TMPDIR at a larger disk{more}")

    def evict(self) -> None:
        """Unmap the pages of spilled tensors read so far (they are read again from the file
        when needed): a mapped page counts in the process's resident memory, and reading a
        stage's spilled activations would map them all."""
        self.spilled = [ref for ref in self.spilled if ref() is not None]
        self.mine = {key: ref for key, ref in self.mine.items() if ref() is not None}
        unmap(*(ref() for ref in self.spilled))

    def release(self, value: np.ndarray) -> None:
        """``value`` is no longer held; an array of :meth:`buffer`'s is free for the next."""
        if isinstance(value, np.memmap):
            return
        self.held -= value.nbytes
        self.recycle(value)

    def recycle(self, array: np.ndarray) -> None:
        """``array``, if :meth:`buffer` handed it out, is free for the next tensor."""
        ref = self.mine.get(id(array))
        if ref is not None and ref() is array:
            self.free.setdefault((array.shape, array.dtype.str), []).append(array)
            self.pooled += array.nbytes

    def drop_free(self) -> None:
        """Let the free arrays go (their memory back to the system)."""
        for arrays in self.free.values():
            for array in arrays:
                self.mine.pop(id(array), None)
        self.free.clear()
        self.pooled = 0


def unmap(*values: np.ndarray | None) -> None:
    """Unmap the pages read of those ``values`` that are spilled tensors (mapped files): read
    chunk after chunk, one layer's spilled input would otherwise stay resident whole until the
    layer is done (EfficientNet-Lite0 on 700 calibration views, a 2 GiB budget: the process
    peaked at 4.6 GB in reconstruction)."""
    for value in values:
        mapped = getattr(value, "_mmap", None)
        if mapped is not None and not mapped.closed and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)


class Runner:
    """One model run forward over every chunk, a segment at a time, from its frontier."""

    def __init__(self, model: onnx.ModelProto, fronts: Frontiers, what: str,
                 chunks: list[Arrays]):
        self.model, self.fronts, self.what = model, fronts, what
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.types = {v.name: v.type for v in (*model.graph.input, *model.graph.value_info,
                                               *model.graph.output)}
        self.position = 0
        self.graph_outputs = {o.name for o in model.graph.output}
        self.reads = [node_inputs(n) for n in self.nodes]
        self.last_read: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                self.last_read[name] = i
        inputs = {i.name for i in model.graph.input} - set(self.inits)
        self.values: list[Arrays] = [{k: fronts.keep(np.asarray(c[k])) for k in inputs if k in c}
                                     for c in chunks]
        self.extra: list[Arrays] = [{} for _ in chunks]
        self.samples = [len(next(iter(c.values()))) if c else 0 for c in chunks]
        first = model.graph.input[0].type.tensor_type.shape.dim[:1] if model.graph.input else []
        self.batch = first[0].dim_param if first and first[0].dim_param else None

    def chunk_values(self, name: str) -> list[Arrays]:
        return [e if name in e else v for v, e in zip(self.values, self.extra)]

    def holds(self, name: str) -> bool:
        """Whether every chunk has ``name`` at the current position."""
        return all(name in v or name in e for v, e in zip(self.values, self.extra))

    def advance(self, stop: int, *, want: tuple[str, ...]) -> None:
        """Run nodes ``[position, stop)`` on every chunk; ``want``: tensors to expose (kept
        until the next advance) besides the new frontier."""
        from spa import validate as val

        start = self.position
        for exposed in self.extra:
            for value in exposed.values():
                self.fronts.release(value)
            exposed.clear()
        if stop <= start:
            self._expose(want)
            return
        produced = {o for n in self.nodes[start:stop] for o in n.output if o}
        live_after = sorted(t for t in produced
                            if self.last_read.get(t, -1) >= stop or t in self.graph_outputs)
        extra = [t for t in want if t in produced and t not in live_after]
        model, outer = self.segment(stop, (*live_after, *extra))
        # with onnxruntime's memory arena, each chunk's run reuses the buffers of the one
        # before (without, every run page-faults fresh ones: ResNet-50's stage-1 tensors are
        # 100 MB a chunk); the outputs go to arrays of our own (Frontiers.buffer), or are
        # copied out of it (`own`), so that what is held does not pin the arena, and the
        # arena goes with the session
        sess = val.session(model, what=f"{self.what} model's segment {start}..{stop}")
        for values, ext, samples in zip(self.values, self.extra, self.samples):
            feeds = {n: np.asarray(values[n]) for n in outer}
            outs = self._run(sess, feeds, (*live_after, *extra), samples)
            unmap(*(values[n] for n in outer))  # (feeds: plain arrays, no file to unmap)
            for n in list(values):
                if self.last_read.get(n, -1) < stop and n not in self.graph_outputs:
                    self.fronts.release(values.pop(n))
            for n in live_after:
                values[n] = self.fronts.keep(outs[n], own=True)
            for n in extra:
                ext[n] = self.fronts.keep(outs[n], own=True)
        self.position = stop
        self._expose(want)

    def _run(self, sess, feeds: Arrays, outputs: Sequence[str], samples: int) -> Arrays:
        """The segment's outputs on one chunk, written into :meth:`Frontiers.buffer` arrays
        when the shapes of all are known (their dims fixed, or the samples' symbol), else
        onnxruntime's own."""
        from spa import validate as val

        shapes = [self._shape(n, samples) for n in outputs]
        buffers: dict[str, np.ndarray] = {}
        for name, shape in zip(outputs, shapes):
            if shape is None:
                break
            buffer = self.fronts.buffer(*shape)
            if buffer is None:
                break
            buffers[name] = buffer
        if len(buffers) == len(outputs):
            try:
                return val.run_into(sess, feeds, buffers)
            except ValidationError:
                pass  # the shapes inferred were not the run's: as onnxruntime allocates
        for buffer in buffers.values():
            self.fronts.recycle(buffer)
        return val.run(sess, feeds)

    def _shape(self, name: str, samples: int) -> tuple[tuple[int, ...], np.dtype] | None:
        """The shape and type of ``name`` on a chunk of ``samples`` (None: not known)."""
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        if t.tensor_type.elem_type not in _FLOATS:
            return None
        dims = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif self.batch is not None and d.dim_param == self.batch:
                dims.append(samples)
            else:
                return None
        return tuple(dims), helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type)

    def segment(self, stop: int, outputs: Sequence[str], *, overridable: Collection[str] = ()
                ) -> tuple[onnx.ModelProto, list[str]]:
        """The model of nodes ``[position, stop)`` answering ``outputs``, and the tensors it
        reads from before (its inputs, sorted). The initializers it reads in ``overridable``
        are also declared inputs, so that a feed replaces them."""
        start = self.position
        nodes = self.nodes[start:stop]
        produced = {o for n in nodes for o in n.output if o}
        read = set().union(*self.reads[start:stop])
        outer = sorted(n for n in read if n not in produced and n not in self.inits)
        inits = sorted(read & set(self.inits))
        declared = [helper.make_tensor_value_info(n, self.inits[n].data_type, self.inits[n].dims)
                    for n in inits if n in overridable]
        seg = helper.make_graph(nodes, f"segment_{start}_{stop}",
                                [*(self._info(n) for n in outer), *declared],
                                [self._info(n) for n in outputs],
                                [self.inits[n] for n in inits])
        return helper.make_model(seg, opset_imports=self.model.opset_import,
                                 ir_version=self.model.ir_version), outer

    def _expose(self, want: tuple[str, ...]) -> None:
        missing = [t for t in want if not all(t in v or t in e
                                              for v, e in zip(self.values, self.extra))]
        if missing:
            raise OptionError(f"reconstruction: the {self.what} model's tensor {missing[0]} "
                              "is not available where its layer needs it")

    def _info(self, name: str) -> onnx.ValueInfoProto:
        t = self.types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return helper.make_tensor_value_info(name, t.tensor_type.elem_type, None)
        return helper.make_empty_tensor_value_info(name)
