"""``quantize_dynamic`` copies in a folder (spa/pipeline/requantize.py): transformers.js's
``model_quantized.onnx`` beside ``model.onnx`` is made again from the pruned plain file with the
settings that made it, instead of being copied unpruned; a file those settings do not reproduce
is copied as it is, and the report says why."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from spa.api import PruneOptions, apply_family, prune_family
from spa.cli import main
from spa.errors import ExitCode
from spa.pipeline import requantize, variants
from tests.test_family import CHECKS
from tests.test_family_variants import _mlp, _outputs, _relative

SETTINGS = [requantize.Settings("QInt8", False, False), requantize.Settings("QUInt8", True, True),
            requantize.Settings("QInt8", False, False, "transformers.js")]


def _transformers_js(src: Path, dst: Path, s: requantize.Settings) -> None:
    """The int8 file as transformers.js's scripts/quantize.py makes it: onnxruntime's
    ONNXQuantizer on the model as read, subgraphs quantised, constant MatMul weights only."""
    from onnxruntime.quantization import QuantizationMode
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    q = ONNXQuantizer(onnx.load(str(src)), s.per_channel, s.reduce_range,
                      mode=QuantizationMode.IntegerOps, static=False,
                      weight_qType=getattr(QuantType, s.weight_type),
                      activation_qType=QuantType.QUInt8, tensors_range=None,
                      nodes_to_quantize=[], nodes_to_exclude=[],
                      op_types_to_quantize=set(IntegerOpsRegistry),
                      extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    q.quantize_model()
    onnx.save(q.model.model, str(dst))


def _folder(tmp_path: Path, s: requantize.Settings, edit=None) -> tuple[Path, Path]:
    """The MLP and its ``quantize_dynamic`` copy with settings ``s`` (``edit``: changed after),
    and calibration samples beside it."""
    src = tmp_path / "mlp"
    src.mkdir()
    onnx.save(_mlp(), str(src / "model.onnx"))
    if s.tool == "transformers.js":
        _transformers_js(src / "model.onnx", src / "model_quantized.onnx", s)
    else:
        quantize_dynamic(src / "model.onnx", src / "model_quantized.onnx",
                         per_channel=s.per_channel, reduce_range=s.reduce_range,
                         weight_type=getattr(QuantType, s.weight_type))
    if edit is not None:
        copy = onnx.load(str(src / "model_quantized.onnx"))
        edit(copy)
        onnx.save(copy, str(src / "model_quantized.onnx"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((256, 6)).astype(np.float32))
    return src, calib


def _integer_weights(path: Path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: tuple(inits[n.input[1]].dims) for n in model.graph.node
            if n.op_type == "MatMulInteger"}


@pytest.mark.parametrize("s", SETTINGS, ids=["int8-per-tensor", "uint8-per-channel-reduced",
                                              "transformers.js"])
def test_a_quantize_dynamic_copy_is_made_again_from_the_pruned_file(tmp_path: Path, s) -> None:
    src, calib = _folder(tmp_path, s)
    assert requantize.settings_of(src / "model.onnx", src / "model_quantized.onnx") == s
    out = tmp_path / "small"
    done = prune_family(src, out, PruneOptions(ratio=0.5, calib=str(calib)), CHECKS)
    # the copy is the refitted plain file quantised with the same settings, node for node
    again = tmp_path / "again.onnx"
    requantize.quantize(out / "model.onnx", again, s)
    assert requantize._signature(onnx.load(str(again))) == \
        requantize._signature(onnx.load(str(out / "model_quantized.onnx")))
    assert done.reports["model.onnx"].fidelity["reconstructed"]
    shapes = _integer_weights(out / "model_quantized.onnx")
    assert sorted(shapes.values()) == sorted([(6, 12), (12, 12), (12, 4)])
    assert "model_quantized.onnx" not in done.skipped
    took = done.refits_taken["model_quantized.onnx"]
    assert took["from"] == "model.onnx" and took["how"] == "quantised again"
    assert took["settings"] == {"weight_type": s.weight_type, "per_channel": s.per_channel,
                                "reduce_range": s.reduce_range, "tool": s.tool}
    assert 0 < took["relative_diff"] <= max(variants.SPREAD * took["relative_diff_before"],
                                            variants.FLOOR)
    # on other inputs it answers as the pruned plain file, within int8's precision
    x = np.random.default_rng(9).standard_normal((64, 6)).astype(np.float32)
    assert _relative(_outputs(out / "model.onnx", x),
                     _outputs(out / "model_quantized.onnx", x)) < 0.1


def test_a_file_the_settings_do_not_reproduce_is_copied_as_it_is(tmp_path: Path) -> None:
    """One code changed by hand: no settings give the file again, so it is another model,
    copied unpruned, and the report says why."""
    def edit(m: onnx.ModelProto) -> None:
        w = next(i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8
                 and len(i.dims) == 2)
        codes = numpy_helper.to_array(w).copy()
        codes[0, 0] = 1 if codes[0, 0] != 1 else 2
        w.CopyFrom(numpy_helper.from_array(codes, w.name))

    src, calib = _folder(tmp_path, SETTINGS[0], edit)
    out = tmp_path / "small"
    done = prune_family(src, out, PruneOptions(ratio=0.5), CHECKS)
    assert (out / "model_quantized.onnx").read_bytes() == \
        (src / "model_quantized.onnx").read_bytes()
    why = done.skipped["model_quantized.onnx"]
    assert "copied as it is; not made again from its pruned plain file" in why
    assert "does not give it again" in why
    assert "model_quantized.onnx" not in done.refits_taken


def test_a_saved_folder_plan_applies_to_the_same_bytes(tmp_path: Path, capsys) -> None:
    src, calib = _folder(tmp_path, SETTINGS[1])
    plan, first, again = tmp_path / "plan.json", tmp_path / "a", tmp_path / "b"
    assert main(["prune", str(src), "-o", str(first), "--ratio", "0.5", "--calib", str(calib),
                 "--plan", str(plan)]) == ExitCode.OK
    assert "model_quantized.onnx: model.onnx dynamically quantised (as quantize_dynamic" in \
        capsys.readouterr().err
    apply_family(src, plan, again, CHECKS)
    digest = {d: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.iterdir()}
              for d in (first, again)}
    assert digest[first] == digest[again]


def test_a_quantisation_that_fails_on_the_pruned_file_leaves_the_copy_as_it_was(
        tmp_path: Path, monkeypatch) -> None:
    src, _ = _folder(tmp_path, SETTINGS[0])
    out = tmp_path / "small"
    quantize = requantize.quantize

    def failing(a: Path, b: Path, s: requantize.Settings) -> None:
        if b.parent.name.startswith("spa-quantize-"):  # the input plain file, reproduced
            return quantize(a, b, s)
        b.write_bytes(b"half-written")  # the pruned one
        raise RuntimeError("unsupported node")

    monkeypatch.setattr(requantize, "quantize", failing)
    done = prune_family(src, out, PruneOptions(ratio=0.5), CHECKS)
    assert (out / "model_quantized.onnx").read_bytes() == \
        (src / "model_quantized.onnx").read_bytes()
    assert "quantize_dynamic failed on the pruned model.onnx: unsupported node" in \
        done.skipped["model_quantized.onnx"]


def test_recover_trains_the_plain_file_and_the_copy_is_made_from_it(tmp_path: Path,
                                                                    capsys) -> None:
    """``--recover`` on such a folder distils ``model.onnx`` alone; the int8 copy is then
    quantised from the trained file, not from the one before training."""
    pytest.importorskip("torch")
    s = SETTINGS[0]
    src, calib = _folder(tmp_path, s)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--calib", str(calib),
                 "--recover", "20", "--json", "-q"]) == ExitCode.OK
    body = json.loads(capsys.readouterr().out)
    assert body["recovery"]["file"] == "model.onnx" and body["recovery"]["steps"] >= 1
    assert body["refits_taken"]["model_quantized.onnx"]["how"] == "quantised again"
    again = tmp_path / "again.onnx"
    requantize.quantize(out / "model.onnx", again, s)
    assert requantize._signature(onnx.load(str(again))) == \
        requantize._signature(onnx.load(str(out / "model_quantized.onnx")))
    if body["recovery"]["kept"] == "recovered":  # the copy is not the one made before training
        start = tmp_path / "start"
        prune_family(src, start, PruneOptions(ratio=0.5, calib=str(calib)), CHECKS)
        assert requantize._signature(onnx.load(str(start / "model_quantized.onnx"))) != \
            requantize._signature(onnx.load(str(out / "model_quantized.onnx")))


def test_a_merged_decoders_int8_copy_is_made_again_from_the_pruned_merged_file(
        tmp_path: Path) -> None:
    """transformers.js's ``decoder_model_merged_quantized.onnx`` (the file its WASM backend
    loads for a seq2seq model: a DynamicQuantizeLinear beside the If, the branches'
    MatMulIntegers inside it) is quantised again from the pruned merged decoder, once that is
    merged back. Before, it was copied as it was: the browser ran the dense decoder."""
    from tests.test_family import BART, MERGED, _decode_merged, _heads

    s = requantize.Settings("QInt8", False, False, "transformers.js")
    src = tmp_path / "bart"
    shutil.copytree(BART, src)
    shutil.copy(MERGED, src)
    _transformers_js(src / "decoder_model_merged.onnx", src / "decoder_model_merged_quantized.onnx",
                     s)
    assert requantize.settings_of(src / "decoder_model_merged.onnx",
                                  src / "decoder_model_merged_quantized.onnx") == s
    dense_int8 = _decode_merged(src, name="decoder_model_merged_quantized.onnx")
    out = tmp_path / "small"
    done = prune_family(src, out, PruneOptions(heads_ratio=0.5, mlp_ratio=0.5), CHECKS)
    assert "decoder_model_merged_quantized.onnx" not in done.skipped
    took = done.refits_taken["decoder_model_merged_quantized.onnx"]
    assert took["from"] == "decoder_model_merged.onnx" and took["how"] == "quantised again"
    assert 0 < took["relative_diff"] <= max(variants.SPREAD * took["relative_diff_before"],
                                            variants.FLOOR)
    again = tmp_path / "again.onnx"
    requantize.quantize(out / "decoder_model_merged.onnx", again, s)
    assert requantize._signature(onnx.load(str(again))) == \
        requantize._signature(onnx.load(str(out / "decoder_model_merged_quantized.onnx")))
    for name in ("present.0.decoder.key", "present.1.encoder.value"):  # the plain file's heads
        assert _heads(out / "decoder_model_merged_quantized.onnx", name) == 2
    # a runtime decodes with it, both branches, as well as with the dense int8 file
    assert _decode_merged(out, name="decoder_model_merged_quantized.onnx") \
        < max(2 * dense_int8, 1e-5)
