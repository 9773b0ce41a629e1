"""Symbolic input dims get working sizes without flags (spa/inputs.py): from the metadata, the
dim's name or position, else by running the original model at growing sizes; ``--input-dim``
always wins; when no size runs, one line and exit 2; onnxruntime's colour codes never reach the
user.

The CLI runs in-process on tiny graphs that do not run at size 1 (what SPA used to feed): a
P-Net-like stack of unpadded convs, a YOLO-like upsample-and-concat neck, and an attention
block with a causal mask baked in at 16 tokens. Each prunes under the numeric oracle
(``--check-masked``) with the chosen sizes in the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import Builder, init_shapes
from onnx import TensorProto

from spa.cli import main
from spa.errors import ExitCode, InputDimsError, one_line
from spa.inputs import Kind, resolve, symbolic_dims

RTOL = 1e-4


def _pnet() -> onnx.ModelProto:
    """MTCNN's P-Net shape: three unpadded 3×3 convs around a 2×2 pool (runs from 12 px)."""
    b = Builder()
    x = b.op("PRelu", b.conv("x", 3, 10, pads=[0] * 4, name="c1"), b.weight(10, 1, 1, name="a1"))
    x = b.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="pool")
    x = b.op("PRelu", b.conv(x, 10, 16, pads=[0] * 4, name="c2"), b.weight(16, 1, 1, name="a2"))
    x = b.op("PRelu", b.conv(x, 16, 32, pads=[0] * 4, name="c3"), b.weight(32, 1, 1, name="a3"))
    prob = b.op("Softmax", b.conv(x, 32, 2, k=1, name="cls"), axis=1)
    box = b.conv(x, 32, 4, k=1, name="box")
    return b.model({"x": ["batch", 3, "h", "w"]},
                   {prob: ["batch", 2, None, None], box: ["batch", 4, None, None]})


def _yolo(metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """A YOLO-like neck: five stride-2 convs, the last level upsampled ×2 and concatenated with
    the one before, so height and width must be multiples of 32."""
    b = Builder()
    x = "images"
    for i, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 12), (12, 16)]):
        x = b.op("Relu", b.conv(x, cin, cout, strides=[2, 2], name=f"d{i + 1}"))
    p5 = b.op("Relu", b.conv(x, 16, 16, strides=[2, 2], name="d5"))
    up = b.op("Resize", p5, "", b.const([1.0, 1.0, 2.0, 2.0]), mode="nearest", name="up")
    cat = b.op("Concat", up, x, axis=1, name="cat")
    y = b.conv(b.op("Relu", b.conv(cat, 32, 16, name="h1")), 16, 6, k=1, name="head")
    m = b.model({"images": ["batch", 3, "height", "width"]}, {y: ["batch", 6, None, None]})
    onnx.helper.set_model_props(m, metadata or {})
    return m


def _attention(mask_len: int = 16, d: int = 8, vocab: int = 20) -> onnx.ModelProto:
    """Token embedding, one attention head whose causal mask is a constant of ``mask_len``
    tokens (traced at that length), and an MLP; it runs only at ``mask_len`` tokens."""
    b = Builder()
    x = b.op("Gather", b.weight(vocab, d, name="emb"), "tokens", axis=0)
    q, k, v = (b.op("MatMul", x, b.weight(d, d, name=f"{n}.w"), name=n) for n in "qkv")
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 2, 1])),
                  b.const(np.float32(d ** -0.5)))
    mask = np.triu(np.full((mask_len, mask_len), -1e4, np.float32), k=1)
    p = b.op("Softmax", b.op("Add", scores, b.const(mask, "mask")), axis=-1)
    x = b.op("Add", x, b.op("MatMul", b.op("MatMul", p, v), b.weight(d, d, name="o.w")))
    hidden = b.op("Relu", b.op("MatMul", x, b.weight(d, 4 * d, name="fc1.w"), name="fc1"))
    y = b.op("Add", x, b.op("MatMul", hidden, b.weight(4 * d, d, name="fc2.w"), name="fc2"))
    return b.model({"tokens": (["batch", "sequence_length"], TensorProto.INT64)},
                   {y: ["batch", "sequence_length", d]})


def _fixed_5x5() -> onnx.ModelProto:
    """Convs with symbolic h, w under a classifier made for 5×5 maps (flattened into a Gemm
    of 4·5·5 inputs): no size SPA tries runs it, not even 1."""
    b = Builder()
    x = b.conv(b.op("Relu", b.conv("x", 3, 8, name="c1")), 8, 4, name="c2")
    y = b.gemm(b.op("Flatten", b.op("Relu", x)), 4 * 5 * 5, 10, name="fc")
    return b.model({"x": ["N", 3, "h", "w"]}, {y: ["N", 10]})


def _prune(tmp_path: Path, model: onnx.ModelProto, *flags: str) -> tuple[int, Path]:
    src, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(model, str(src))
    code = main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--check-masked",
                 "--report", str(report), "--report-html", str(tmp_path / "r.html"), *flags])
    return code, report


def _dims_reported(report: Path) -> dict[str, tuple[int, str]]:
    r = json.loads(report.read_text())
    assert r["masked_relative_diff"] <= RTOL and r["params_after"] < r["params_before"]
    html = (report.parent / "r.html").read_text()
    assert all(f"{k}={v} ({how})" in html for k, (v, how) in _pairs(r).items())
    return _pairs(r)


def _pairs(r: dict) -> dict[str, tuple[int, str]]:
    return {k: (v, r["input_dims_from"][k]) for k, v in r["input_dims"].items()}


def test_pnet_like_net_prunes_at_sizes_from_dim_names(tmp_path, capfd):
    code, report = _prune(tmp_path, _pnet())
    assert code == ExitCode.OK
    assert _dims_reported(report) == {"batch": (1, "name"), "h": (32, "name"),
                                      "w": (32, "name")}
    out, err = capfd.readouterr()
    assert "symbolic input dims: batch=1 (name), h=32 (name), w=32 (name)" in out
    assert "\x1b" not in err


@pytest.mark.parametrize("metadata, expect", [
    ({}, {"batch": (1, "name"), "height": (32, "name"), "width": (32, "name")}),
    ({"batch": "1", "imgsz": "[64, 96]", "stride": "32"},
     {"batch": (1, "metadata"), "height": (64, "metadata"), "width": (96, "metadata")}),
])
def test_yolo_like_neck_prunes_at_multiples_of_32(tmp_path, capfd, metadata, expect):
    code, report = _prune(tmp_path, _yolo(metadata))
    assert code == ExitCode.OK
    assert _dims_reported(report) == expect
    # d3's 12 channels (under a block) halve to 6; d4's 16, read by the g=1 convs d5 and h1,
    # keep their whole kernel block (--round-to auto, the default; 8 with --round-to 1).
    assert init_shapes(tmp_path / "p.onnx")["d4.w"] == (16, 6, 3, 3)
    assert "\x1b" not in capfd.readouterr().err


def test_flag_wins_over_metadata_and_search(tmp_path, capfd):
    code, report = _prune(tmp_path, _yolo({"imgsz": "640"}), "--input-dim", "height=160")
    assert code == ExitCode.OK
    assert _dims_reported(report) == {"batch": (1, "name"), "height": (160, "flag"),
                                      "width": (640, "metadata")}


def test_attention_with_a_baked_in_mask_finds_its_sequence_length(tmp_path, capfd):
    code, report = _prune(tmp_path, _attention())
    assert code == ExitCode.OK
    assert _dims_reported(report) == {"batch": (1, "name"),
                                      "sequence_length": (16, "searched")}
    assert init_shapes(tmp_path / "p.onnx")["fc1.w"] == (8, 16)


def _vit_stem() -> onnx.ModelProto:
    """🤗 Optimum's ViT inputs: ``pixel_values [batch_size, num_channels, height, width]``,
    cast before the patch embedding (as CLIP's is); a linear layer on ``features [N, K]``."""
    b = Builder()
    x = b.op("Cast", "pixel_values", to=TensorProto.FLOAT)
    y = b.conv(b.op("Relu", b.conv(x, 3, 8, k=4, strides=[4, 4], pads=[0] * 4, name="patch")),
               8, 4, k=1, name="c2")
    z = b.op("MatMul", b.op("Relu", b.op("MatMul", "features", b.weight(6, 8, name="fc1.w"))),
             b.weight(8, 2, name="fc2.w"))
    return b.model({"pixel_values": ["batch_size", "num_channels", "height", "width"],
                    "features": ["N", "K"]},
                   {y: ["batch_size", 4, None, None], z: ["N", 2]})


def test_dims_a_weight_contracts_take_its_length(tmp_path, capfd):
    """``num_channels`` is what the patch embedding's weight reads (3), ``K`` what the first
    MatMul's does (6): no run has another size, so neither is searched (the ladder of an
    unknown dim, 1, 8, 32, 128, holds neither)."""
    code, report = _prune(tmp_path, _vit_stem())
    assert code == ExitCode.OK
    assert _dims_reported(report) == {
        "batch_size": (1, "name"), "num_channels": (3, "weight"), "height": (32, "name"),
        "width": (32, "name"), "N": (1, "name"), "K": (6, "weight")}


def test_no_size_runs_the_model_one_line_exit_2(tmp_path, capfd):
    code, _ = _prune(tmp_path, _fixed_5x5())
    assert code == ExitCode.BAD_INPUT
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "\x1b" not in err and "Traceback" not in err
    assert "symbolic input dims h, w" in err and "--input-dim NAME=SIZE" in err
    assert not (tmp_path / "p.onnx").exists()
    code, report = _prune(tmp_path, _fixed_5x5(), "--input-dim", "h=5", "--input-dim", "w=5")
    assert code == ExitCode.OK
    assert _dims_reported(report) == {"N": (1, "name"), "h": (5, "flag"), "w": (5, "flag")}


def test_onnxruntime_failure_is_one_line_without_colour(tmp_path, capfd):
    """Sizes the user forces that do not run: validation quotes onnxruntime, exit 3."""
    code, _ = _prune(tmp_path, _pnet(), "--input-dim", "h=4", "--input-dim", "w=4")
    assert code == ExitCode.VALIDATION_FAILED
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "\x1b" not in err
    assert "onnxruntime failed to run the model" in err and "Invalid input shape" in err


def test_one_line_strips_ansi_escapes():
    text = "\x1b[1;31m2026 [E:onnxruntime] Non-zero status\x1b[m\n  next\x1b]0;t\x07 line"
    assert one_line(RuntimeError(text)) == "2026 [E:onnxruntime] Non-zero status next line"


# --- the resolution rule, with a stand-in for onnxruntime ------------------------------------
def _inputs(*specs: tuple[str, list, type]) -> list[gs.Variable]:
    return [gs.Variable(name, dtype=dtype, shape=shape) for name, shape, dtype in specs]


class _Probe:
    """Runs when every dim of ``kind`` is at least ``least``; records the sizes tried."""

    def __init__(self, least: dict[str, int] | None = None):
        self.least, self.tried = least or {}, []

    def __call__(self, sizes: dict[str, int]) -> str | None:
        self.tried.append(dict(sizes))
        low = [k for k, n in self.least.items() if sizes[k] < n]
        return f"too small: {low}" if low else None


def test_kinds_from_names_and_positions():
    dims = symbolic_dims(_inputs(("img", ["unk__0", 3, "unk__1", None], np.float32),
                                 ("nhwc", ["B", None, "unk__2", 3], np.float32),
                                 ("ids", ["batch_size", "unk__3"], np.int64),
                                 ("extra", [2, "num_boxes"], np.float32)))
    assert {k: d.kind for k, d in dims.items()} == {
        "unk__0": Kind.BATCH, "unk__1": Kind.SPATIAL, "img[3]": Kind.SPATIAL, "B": Kind.BATCH,
        "nhwc[1]": Kind.SPATIAL, "unk__2": Kind.SPATIAL, "batch_size": Kind.BATCH,
        "unk__3": Kind.SEQUENCE, "num_boxes": Kind.UNKNOWN}


def test_search_climbs_until_the_model_runs():
    probe = _Probe({"height": 100, "width": 100})
    inputs = _inputs(("x", ["batch", 3, "height", "width"], np.float32))
    found = resolve(inputs, {}, {}, probe)
    assert found.sizes == {"batch": 1, "height": 128, "width": 128}
    assert found.how == {"batch": "name", "height": "searched", "width": "searched"}
    assert [t["height"] for t in probe.tried] == [32, 64, 128]


def test_size_1_is_the_last_resort():
    """A bias baked in at one size broadcasts only against 1: tried after every ladder."""
    inputs = _inputs(("x", ["N", 3, "H", "W"], np.float32))
    found = resolve(inputs, {}, {}, lambda s: None if s["H"] == 1 else "broadcast")
    assert found.describe() == "N=1 (name), H=1 (searched), W=1 (searched)"


def test_no_run_when_nothing_is_open():
    probe = _Probe()
    inputs = _inputs(("x", ["N", 3, "H", "W"], np.float32))
    found = resolve(inputs, {"imgsz": "(224, 320)"}, {"N": 4}, probe)
    assert found.describe() == "N=4 (flag), H=224 (metadata), W=320 (metadata)"
    assert resolve(_inputs(("x", ["N", 8], np.float32)), {}, {}, probe).sizes == {"N": 1}
    assert probe.tried == []


def test_error_names_the_open_dims():
    with pytest.raises(InputDimsError, match=r"dims S, unk__1 .*--input-dim NAME=SIZE"):
        resolve(_inputs(("ids", ["N", "S"], np.int64), ("m", [1, 3, "unk__1", 8], np.float32)),
                {}, {}, _Probe({"S": 10_000}))
