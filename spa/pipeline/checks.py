"""Validation around the rewrite: what it compares against, and the comparison itself.

Before the rewrite: :func:`oracle_decision` (whether the numeric oracle of DESIGN.md runs for
this plan, and the words the report gives when it does not), :func:`bfloat16_checks` and
:func:`reference_models` (the original, a maker of the masked original, the outputs no weight
reaches, written to the staging directory). After it: :func:`run_checks` runs original and
pruned model in onnxruntime on the same random inputs and compares them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa import generation as gen
from spa import validate as val
from spa.generation import SignatureChange
from spa.ir import to_onnx
from spa.ir.external import attach_external
from spa.ir.save import Staging, streamed, write_proto, write_streamed
from spa.ir.widen import uses_bfloat16, uses_float16, widened
from spa.metrics import file_size, interleaved_times, latency_ms
from spa.passes.latency import CPU_PROVIDER

if TYPE_CHECKING:
    import onnxruntime as ort

    from spa.coupling.analysis import Analysis
    from spa.ir.load import LoadedModel
    from spa.pipeline.options import CheckOptions
    from spa.plan import Plan

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def oracle_decision(analysis: Analysis, the_plan: Plan, checks: CheckOptions
                     ) -> tuple[CheckOptions, str]:
    """Whether the numeric oracle runs (``checks.check_masked`` made a bool), and the words the
    report gives when it does not."""
    exemption = val.oracle_exemption(analysis, the_plan)
    if checks.check_masked is False:
        why = "off (--no-check)"
    elif not checks.validate and checks.check_masked is None:
        why = "not run (--no-validate)"
    elif exemption is not None:
        why = f"does not apply: {exemption}"
        if checks.check_masked:
            log.warning("the masked oracle does not apply: %s; validating without it",
                        exemption)
    else:
        return dataclasses.replace(checks, validate=True, check_masked=True), "held"
    return dataclasses.replace(checks, check_masked=False), why


@dataclass(frozen=True)
class References:
    """What validation compares the pruned model against: the original (a file, or a model),
    a maker of the masked original (None: the oracle does not run), and the outputs no weight
    reaches (compared with the original's exactly)."""

    original: PathLike | onnx.ModelProto
    masked: Callable[[], PathLike | onnx.ModelProto] | None
    weight_free: set[str]


def reference_models(analysis: Analysis, the_plan: Plan, checks: CheckOptions,
                     stage: Staging) -> References | None:
    """What validation compares against, taken before the rewrite: the original model (the
    normal form the analysis ran on), a maker of the masked original (the numeric oracle) and
    the outputs no weight reaches. A streamed model's are written into the staging directory,
    tensor by tensor."""
    if not (checks.validate or checks.check_masked):
        return None
    loaded = analysis.model
    if not streamed(loaded):
        # On disk, not held: onnxruntime reads it when validation starts, after the rewrite.
        original_path = stage.dir / "original.onnx"
        proto = to_onnx(loaded)
        weight_free = val.weight_free_outputs(proto)
        write_proto(proto, original_path)
        del proto
        if not checks.check_masked:
            return References(original_path, None, weight_free)
        return References(original_path, lambda: val.masked_model(
            onnx.load(str(original_path)), analysis, the_plan), weight_free)
    base = loaded.path.parent if loaded.path is not None else None
    refs = to_onnx(loaded, references=True)
    weight_free = val.weight_free_outputs(refs)
    original = _stage_copy(loaded, refs, base, stage, "original")
    if not checks.check_masked:
        return References(original, None, weight_free)
    masked = val.masked_model(refs, analysis, the_plan, base_dir=base)
    masked_path = _stage_copy(loaded, masked, base, stage, "masked")
    return References(original, lambda: masked_path, weight_free)


def _stage_copy(loaded: LoadedModel, model: onnx.ModelProto, base: Path | None,
                stage: Staging, label: str) -> Path:
    """Write ``model`` (external tensors read from ``base``) into ``stage/label/``."""
    graph = gs.import_onnx(model)
    if base is not None:
        attach_external(graph, base)
    path = stage.dir / label / stage.model_path.name
    path.parent.mkdir()
    write_streamed(loaded, path, graph, check=False)
    return path


def bfloat16_checks(loaded: LoadedModel, checks: CheckOptions) -> tuple[CheckOptions, bool]:
    """Validation of a bfloat16 model runs float32 twins (spa/ir/widen.py: onnxruntime's CPU
    has no bfloat16 kernels), whose latency says nothing of the model's: it is not measured.
    Returns the checks to run and whether to widen."""
    if not (checks.validate or checks.check_masked) or not uses_bfloat16(loaded.graph):
        return checks, False
    log.warning("bfloat16 model: onnxruntime has no bfloat16 kernels on CPU, so validation runs "
                "float32 twins of the original and pruned models (weights widened exactly); "
                "latency is not measured")
    return dataclasses.replace(checks, latency=False), True


def float16_oracle(loaded: LoadedModel, checks: CheckOptions) -> bool:
    """Whether the oracle compares float32 twins of the pruned model and the masked original:
    a float16 model's own rounding is at the oracle's tolerance (spa/ir/widen.py). The files
    themselves still run for everything else."""
    return bool(checks.check_masked) and uses_float16(loaded.graph)


def float_session(model: PathLike | onnx.ModelProto, what: str
                  ) -> ort.InferenceSession | None:
    """A session of ``model`` for the oracle whose quantised parts compute on float
    activations; None when nothing in it quantises them. MatMulNBits run at
    ``accuracy_level`` 0: at levels 1-4 onnxruntime quantises the activations (to int8 at 4,
    as onnxruntime-genai's builder writes), and a float-rounding difference between the pruned
    and the masked model (1e-7) flips an int8 rounding now and then: 1e-3 in the outputs, no
    pruning error. The model
    itself (latency, the written file) keeps its level. A file's level-0 copy is written beside
    it (its external data stays where it is) and removed once the session holds the model.
    A QDQ model (QuantizeLinear nodes) runs its pairs around float kernels, not fused into
    integer ones: on a CPU without AVX-512 VNNI, onnxruntime's u8·s8 kernels add products in
    pairs that saturate at int16, and which channels pair up differs between the pruned model
    and the masked one, whose removed channels are zeros in place (a QDQ MobileNetV2 at ratio
    0.3: relative 0.077 fused, within the tolerance unfused; the written file is not changed).
    Blocked weight DequantizeLinear (int4 in QDQ form) likewise: fused, onnxruntime runs it
    with the MatMul as a MatMulNBits at accuracy level 4 (int8 activations; all-MiniLM-L6-v2
    in that form: relative 0.0026 between pruned and masked)."""
    def levels(m: onnx.ModelProto) -> list[onnx.AttributeProto]:
        return [a for n in m.graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "accuracy_level" and a.i > 0]

    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = model if isinstance(model, onnx.ModelProto) else \
        onnx.load(str(path), load_external_data=False)
    qdq = any(n.op_type == "QuantizeLinear" or (
        n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i
                                                for a in n.attribute))
        for n in proto.graph.node)
    if not levels(proto):
        return val.session(model, what=what, fuse_qdq=False) if qdq else None
    if path is None:  # a copy: the model itself keeps its level
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy
    for a in levels(proto):
        a.i = 0
    if path is None:
        return val.session(proto, what=what, fuse_qdq=not qdq)
    fd, name = tempfile.mkstemp(prefix=".spa-level0-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, name)
        return val.session(name, what=what, fuse_qdq=not qdq)
    finally:
        os.unlink(name)


#: Two models of at most this many bytes together are timed in interleaved rounds, both sessions
#: alive: timed one after the other, all-MiniLM-L6-v2 pruned for 2x measured x1.84 in the report
#: and x2.20 interleaved (x1.97 and x2.31 in two sequential repeats of the same pair).
INTERLEAVED_BYTES = 1 << 30


def _bytes(model: PathLike | onnx.ModelProto) -> int:
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    return file_size(os.fspath(model))


def run_checks(original: PathLike | onnx.ModelProto,
               masked: Callable[[], PathLike | onnx.ModelProto] | None, weight_free: set[str],
              pruned: PathLike | onnx.ModelProto, checks: CheckOptions, *,
              widen: bool = False, half: bool = False, change: SignatureChange | None = None
               ) -> dict:
    """Run the original, then the pruned model (one session at a time: memory), compare:
    signature; shape-valued outputs (``weight_free``) exactly; with the oracle, every output
    against the masked original (integer and bool ones exactly). ``widen``: run their float32
    twins; ``half``: compare the pruned model and the masked original as float32 twins of
    their float16 (:func:`float16_oracle`). ``change``: the KV-cache inputs and outputs the
    pruned model has narrower (fed and compared at the kept heads); with the oracle, the
    greedy loop of spa/generation.py then runs too. Their latencies are timed in interleaved
    rounds when the two models together are at most :data:`INTERLEAVED_BYTES` (both sessions
    are alive then), else one after the other."""
    twin = widened if widen else (lambda model: model)
    change = change or SignatureChange()
    extra: dict = {}
    s = val.session(twin(original), what="original model", threads=checks.latency_threads,
                    provider=checks.provider)
    feeds = val.random_inputs(s, dims=dict(checks.input_dims))
    out_orig = change.kept_outputs(val.run(s, feeds))
    # one CPU thread runs in the calling thread: its CPU time, which the load of a shared
    # machine does not inflate (the latency table times the same way)
    clock = time.thread_time if checks.latency_threads == 1 and \
        checks.provider == CPU_PROVIDER else time.perf_counter
    together = checks.latency and _bytes(original) + _bytes(pruned) <= INTERLEAVED_BYTES
    dense = s if together else None
    if checks.latency and not together:
        extra["latency_ms_before"] = latency_ms(s, feeds, runs=checks.latency_runs,
                                                clock=clock)
    s = None
    s = val.session(twin(pruned), what="pruned model", threads=checks.latency_threads,
                    provider=checks.provider)
    out_pruned = val.run(s, change.pruned_feeds(feeds))
    if dense is not None:
        before, after = interleaved_times((dense, feeds), (s, change.pruned_feeds(feeds)),
                                          runs=checks.latency_runs, warmup=3, clock=clock,
                                          label="latency")
        extra.update(latency_ms_before=statistics.median(before),
                     latency_ms_after=statistics.median(after))
        dense = None
    elif checks.latency:
        extra["latency_ms_after"] = latency_ms(s, change.pruned_feeds(feeds),
                                               runs=checks.latency_runs, clock=clock)
    # a decoder's session is kept for the greedy loop, run with the masked original's: when
    # its signature changed, or (depth pruning) blocks were dropped
    generate = bool(change) or (change.depth and bool(change.caches))
    if not generate:
        s = None
    val.check_signature(out_orig, out_pruned)
    val.check_exact(out_orig, out_pruned, weight_free, what="original")
    if checks.check_masked and masked is not None:
        exact = (lambda model: widened(model, half=True)) if half else twin
        compared = exact(pruned)  # the pruned model as the oracle runs it
        if half:  # float16 inputs fed as float32 to the twins
            feeds = {k: v.astype(np.float32) if v.dtype == np.float16 else v
                     for k, v in feeds.items()}
            s = val.session(compared, what="pruned model (float32 twin)")
            out_pruned = val.run(s, change.pruned_feeds(feeds))
        reference = exact(masked())
        s_masked = float_session(reference, "masked original") or \
            val.session(reference, what="masked original")
        out_masked = change.kept_outputs(val.run(s_masked, feeds))
        s_float = float_session(compared, "pruned model (float activations)")
        if s_float is not None:  # compared with float activations, as the masked original
            s = s_float
            out_pruned = val.run(s, change.pruned_feeds(feeds))
        val.check_exact(out_masked, out_pruned, out_masked, what="masked original")
        c = val.check_close(out_masked, out_pruned, rtol=checks.rtol)
        extra.update(masked_max_abs_diff=c.max_abs, masked_relative_diff=c.relative)
        if generate:
            dense = (lambda: val.session(exact(original), what="original model")) \
                if change.depth else None
            extra["generation"] = gen.greedy_check(s_masked, s, change, dict(checks.input_dims),
                                                   dense=dense)
    return extra
