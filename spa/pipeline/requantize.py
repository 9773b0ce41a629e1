"""Dynamically quantised copies of a folder's files: ``model_quantized.onnx`` beside
``model.onnx``.

transformers.js folders hold ``model_quantized.onnx`` (int8: what its WASM backend loads by
default), made from the plain file by onnxruntime's dynamic quantiser (``quantize_dynamic``, or
its ``ONNXQuantizer`` called as transformers.js's scripts/quantize.py calls it): MatMuls become
``DynamicQuantizeLinear → MatMulInteger → Cast → Mul``, embeddings ``DequantizeLinear``. SPA does
not prune integer-domain ops (spa/coupling/rules/quant.py), so such a file was copied as it was:
the browser kept running the dense model. Instead:

* **Found by reproduction** (:func:`settings_of`): the settings are read off the file — the
  weight type from its ``MatMulInteger`` weights' element type, per-channel from their zero
  points' length, a reduced range tried when every code fits in 7 bits, each of the two ways
  of calling the quantiser (:data:`TOOLS`) — and the file counts as a copy only if quantising
  the input plain file with them gives it again, node for node and value for value. Anything
  else (another tool's quantisation, a hand edit, weights in external data) is copied as it
  is, as before, and the report says why.
* **Written as the pruned plain file quantised the same way** (:func:`requantized`): the same
  call on what SPA wrote for the plain file, so its refits, OBSPA's compensation and
  ``--recover``'s training are in it, and its channels are the plain file's.
* **Checked**, with validation on: on seeded random inputs it answers as the pruned plain file
  within :data:`spa.pipeline.variants.SPREAD` times the two input files' difference (floor
  :data:`~spa.pipeline.variants.FLOOR`), as a float16 copy is.

``spa apply folder/`` writes the same bytes: the quantisation is a function of the written
plain file.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from spa.errors import one_line
from spa.ir.params import graphs_in
from spa.ir.save import external_data_files
from spa.pipeline.variants import answers, plain_name

log = logging.getLogger(__name__)

#: the variants transformers.js names its quantize_dynamic files with (q8, int8, uint8)
SUFFIXES = ("_quantized", "_int8", "_uint8")
#: op -> the input slots of its weight and of the weight's zero point
_SLOTS = {"MatMulInteger": (1, 3), "ConvInteger": (1, 3)}


@dataclass(frozen=True)
class Settings:
    """The quantiser's arguments that made a file, and how it was called."""

    weight_type: str  # "QInt8" or "QUInt8"
    per_channel: bool
    reduce_range: bool
    tool: str = "quantize_dynamic"  # one of TOOLS


#: How the quantiser is called: ``quantize_dynamic`` (shape inference first, subgraphs left
#: float), or ``ONNXQuantizer`` on the model as read with subgraphs quantised too, as
#: transformers.js's scripts/quantize.py calls it for its ``_quantized``, ``_int8`` and
#: ``_uint8`` files. The two write different node names, so each is tried.
TOOLS = ("quantize_dynamic", "transformers.js")


def settings_of(plain: Path, quantized: Path) -> Settings | str:
    """The settings with which quantising ``plain`` (one of :data:`TOOLS`) gives ``quantized``
    again, or why there are none."""
    model = onnx.load(str(quantized), load_external_data=False)  # whole when none is external
    for path, header in ((plain, onnx.load(str(plain), load_external_data=False)),
                         (quantized, model)):
        if external_data_files(header):
            return f"{path.name} holds weights in external data (not quantised again)"
    graphs = graphs_in(model.graph)  # a merged decoder quantises the matmuls of its branches
    inits = {i.name: i for g in graphs for i in g.initializer}
    weights, zero_points = [], []
    for node in (n for g in graphs for n in g.node):
        slots = _SLOTS.get(node.op_type)
        if slots is None or node.domain not in ("", "ai.onnx"):
            continue
        slot, zp_slot = slots
        w = inits.get(node.input[slot]) if len(node.input) > slot else None
        if w is None:
            return f"{node.op_type} node '{node.name}' has no constant weight"
        weights.append(numpy_helper.to_array(w))
        zp = node.input[zp_slot] if len(node.input) > zp_slot else ""
        zero_points.append(numpy_helper.to_array(inits[zp]) if zp in inits else None)
    if not weights:
        return "no MatMulInteger or ConvInteger weight: not a quantize_dynamic file"
    types = {w.dtype for w in weights}
    if len(types) != 1 or next(iter(types)) not in (np.int8, np.uint8):
        return f"weights of element types {sorted(map(str, types))}"
    signed = next(iter(types)) == np.int8
    per_channel = any(zp is not None and zp.size > 1 for zp in zero_points)
    low, high = (-64, 63) if signed else (0, 127)
    narrow = all(int(w.min()) >= low and int(w.max()) <= high for w in weights)
    target = _signature(model)
    for tool in TOOLS:
        for reduce_range in ((True, False) if narrow else (False,)):
            s = Settings("QInt8" if signed else "QUInt8", per_channel, reduce_range, tool)
            with tempfile.TemporaryDirectory(prefix="spa-quantize-") as tmp:
                out = Path(tmp) / quantized.name
                quantize(plain, out, s)
                if _signature(onnx.load(str(out))) == target:
                    return s
    return ("quantising the input plain file does not give it again (weight type "
            f"{'QInt8' if signed else 'QUInt8'}, per_channel={per_channel}, reduce_range "
            f"{'either way' if narrow else 'False'}, by {' or '.join(TOOLS)})")


def quantize(src: Path, dst: Path, s: Settings) -> None:
    """Write ``src`` quantised with ``s`` (the way ``s.tool`` calls the quantiser) to ``dst``."""
    from onnxruntime.quantization import QuantizationMode, QuantType, quantize_dynamic
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    # onnxruntime's quantizer logs a pre-processing hint on the root logger at WARNING
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    weights = getattr(QuantType, s.weight_type)
    try:
        if s.tool == "quantize_dynamic":
            quantize_dynamic(src, dst, per_channel=s.per_channel, reduce_range=s.reduce_range,
                             weight_type=weights)
            return
        quantizer = ONNXQuantizer(
            onnx.load(str(src)), s.per_channel, s.reduce_range, mode=QuantizationMode.IntegerOps,
            static=False, weight_qType=weights, activation_qType=QuantType.QUInt8,
            tensors_range=None, nodes_to_quantize=[], nodes_to_exclude=[],
            op_types_to_quantize=set(IntegerOpsRegistry), extra_options={
                "EnableSubgraph": True, "MatMulConstBOnly": True})
        quantizer.quantize_model()
        onnx.save(quantizer.model.model, str(dst))
    finally:
        root.setLevel(level)


def _signature(model: onnx.ModelProto) -> tuple:
    """The model's nodes (in order, with their attributes) and its initializers' values."""
    nodes = [(n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
              tuple(a.SerializeToString(deterministic=True) for a in n.attribute))
             for n in model.graph.node]
    inits = sorted((i.name, i.data_type, tuple(i.dims), numpy_helper.to_array(i).tobytes())
                   for i in model.graph.initializer)
    return nodes, inits


def requantizable(src: Path, names: list[str], pruned: set[str]) -> dict[str, Settings | str]:
    """For each variant among ``names`` (files not pruned) whose plain file in ``src`` is
    among ``pruned``: its settings, or why it is not a dynamically quantised copy."""
    out: dict[str, Settings | str] = {}
    for n in names:
        plain = plain_name(n, SUFFIXES)
        if plain is not None and plain in pruned:
            out[n] = settings_of(src / plain, src / n)
    return out


def requantized(src: Path, folder: Path, found: Mapping[str, Settings | str],
                dims: Mapping[str, Mapping[str, int]], validate: bool) -> dict[str, dict | str]:
    """Write over each copy in ``folder`` (the staged output) its pruned plain file quantised
    with the copy's settings; with ``validate``, check that it answers as that file. Per
    copy: from which file, the settings, and the check's relative differences; or why it
    stays as it was (the quantiser failed on the pruned file: the input copy is put back, as
    before)."""
    out: dict[str, dict | str] = {}
    for n, s in found.items():
        if isinstance(s, str):
            out[n] = s
            continue
        plain = plain_name(n, SUFFIXES)
        assert plain is not None
        try:
            quantize(folder / plain, folder / n, s)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises anything
            shutil.copy2(src / n, folder / n)
            out[n] = f"{s.tool} failed on the pruned {plain}: {one_line(exc)}"
            log.warning("%s: copied as it is: %s", n, out[n])
            continue
        took: dict = {"from": plain, "how": "quantised again", "settings": asdict(s)}
        if validate:
            took |= answers(src, folder, n, plain, dict(dims.get(plain, {})),
                            "dynamically quantised copy")
        out[n] = took
    return out


__all__ = ["TOOLS", "Settings", "quantize", "requantizable", "requantized", "settings_of"]
