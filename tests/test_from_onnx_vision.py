"""``spa.torch.from_onnx`` runs ONNX's sampling, region and detection ops as onnxruntime does.

One node at a time (spa/torch/vision_ops.py) against onnxruntime over the spec's attributes,
and, where onnxruntime's CPU kernels stop short of the spec (LRN with an even ``size`` or not
4-D, DeformConv not 2-D), against numpy references of the spec's formulas written here. The
differentiable ops also train: with their float inputs as initializers, the gradients that
reach them are finite and not zero. Modes neither torch nor onnxruntime has are refused by
name, at run time.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

torch = pytest.importorskip("torch")

from interpreted import ours  # noqa: E402

import spa.torch as st  # noqa: E402
from spa import validate as val  # noqa: E402

RNG = np.random.default_rng(0)
F32 = np.float32


def _model(op_type: str, opset: int, feeds: dict[str, np.ndarray],
           consts: dict[str, np.ndarray] | None = None, names: list[str] | None = None,
           **attrs) -> onnx.ModelProto:
    """One node, output ``y``: ``feeds`` are graph inputs, ``consts`` initializers; its inputs
    ``names`` (default: feeds then consts; "" for an omitted optional one)."""
    consts = consts or {}
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in feeds.items()]
    node = helper.make_node(op_type, names if names is not None else [*feeds, *consts], ["y"],
                            **attrs)
    graph = helper.make_graph([node], "g", vi, [helper.make_empty_tensor_value_info("y")],
                              [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _agrees(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5,
            atol: float = 1e-6) -> np.ndarray:
    expected = val.run(val.session(model), feeds)["y"]
    got = ours(model, feeds)[0]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    return expected


def _trains(model: onnx.ModelProto, names: tuple[str, ...],
            feeds: dict[str, np.ndarray] | None = None) -> None:
    """A random linear loss of the output gives every initializer in ``names`` a finite,
    non-zero gradient (a random weighting: a plain sum of squares is constant under MVN)."""
    module = st.from_onnx(model)
    out = module(*[torch.from_numpy(v) for v in (feeds or {}).values()])
    weights = torch.from_numpy(np.random.default_rng(1).standard_normal(out.shape).astype(F32))
    (out * weights).sum().backward()
    tensors = module.onnx_tensors()
    for name in names:
        grad = tensors[name].grad
        assert grad is not None and bool(torch.isfinite(grad).all()), name
        assert float(grad.abs().sum()) > 0, name


def _normal(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(F32)


# ---- GridSample, AffineGrid -----------------------------------------------------------------
_IMAGE = _normal(2, 3, 5, 6)
# random points inside and beyond the border, and a mesh of points that fall on pixel centres
# and half-way between them (nearest rounds those half to even) in both alignments
_MESH = np.array([-3.1, -1, -0.25, 0, 0.25, 0.5, 1, 1.75], F32)
_GRID = np.concatenate([RNG.uniform(-1.4, 1.4, (2, 4, 8, 2)).astype(F32), np.broadcast_to(
    np.stack(np.meshgrid(_MESH, _MESH), -1)[None], (2, 8, 8, 2))], axis=1)
_MODES = {16: ("bilinear", "nearest", "bicubic"), 20: ("linear", "nearest", "cubic")}
_PADDINGS = ("zeros", "border", "reflection")


@pytest.mark.parametrize("opset", [16, 20])
@pytest.mark.parametrize("mode", range(3), ids=["linear", "nearest", "cubic"])
@pytest.mark.parametrize("padding", _PADDINGS)
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_4d_matches_onnxruntime(opset, mode, padding, align):
    feeds = {"x": _IMAGE, "grid": _GRID}
    _agrees(_model("GridSample", opset, feeds, mode=_MODES[opset][mode], padding_mode=padding,
                   align_corners=align), feeds)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", _PADDINGS)
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_5d_matches_onnxruntime(mode, padding, align):
    feeds = {"x": _normal(1, 2, 3, 4, 5),
             "grid": RNG.uniform(-1.3, 1.3, (1, 2, 3, 4, 3)).astype(F32)}
    _agrees(_model("GridSample", 20, feeds, mode=mode, padding_mode=padding,
                   align_corners=align), feeds)


@pytest.mark.parametrize("mode", ["linear", "cubic", "nearest"])
def test_grid_sample_trains_input_and_grid(mode):
    """Gradients reach the image and (but for nearest, piecewise constant) the grid."""
    consts = {"x": _IMAGE, "grid": RNG.uniform(-0.9, 0.9, (2, 4, 5, 2)).astype(F32)}
    model = _model("GridSample", 20, {}, consts, mode=mode, padding_mode="border")
    _agrees(model, {})
    _trains(model, ("x",) if mode == "nearest" else ("x", "grid"))


@pytest.mark.parametrize("opset, mode, x, match", [
    (16, "linear", _IMAGE, "GridSample with mode=linear"),  # opset 20's name
    (20, "bicubic", _IMAGE, "GridSample with mode=bicubic"),  # opset 16's name
    (20, "cubic", _normal(1, 1, 2, 3, 4), "GridSample with mode=cubic on 5-D input"),
])
def test_grid_sample_refuses_what_it_cannot_run_by_name(opset, mode, x, match):
    """onnxruntime refuses the other opset's mode names, and neither it nor torch has
    tricubic sampling."""
    grid = np.zeros((1, *[2] * (x.ndim - 2), x.ndim - 2), F32)
    model = _model("GridSample", opset, {"x": x, "grid": grid}, mode=mode)
    with pytest.raises(st.UnsupportedOpsError, match=match):
        ours(model, {"x": x, "grid": grid})[0]


@pytest.mark.parametrize("size", [[2, 3, 4, 5], [2, 3, 1, 5], [2, 3, 2, 3, 4], [2, 1, 1, 3, 2]])
@pytest.mark.parametrize("align", [0, 1])
def test_affine_grid_matches_onnxruntime_and_trains(size, align):
    """2-D and 3-D; a one-pixel axis with ``align_corners=1`` sits at 1, as in onnxruntime
    (the spec's step divides by zero there)."""
    spatial = len(size) - 2
    theta = _normal(2, spatial, spatial + 1)
    model = _model("AffineGrid", 20, {"size": np.array(size, np.int64)}, {"theta": theta},
                   names=["theta", "size"], align_corners=align)
    _agrees(model, {"size": np.array(size, np.int64)})
    _trains(model, ("theta",), {"size": np.array(size, np.int64)})


# ---- LRN, MeanVarianceNormalization ---------------------------------------------------------
def _lrn_reference(x: np.ndarray, size: int, alpha: float, beta: float, bias: float
                   ) -> np.ndarray:
    """The spec's formula, channel by channel."""
    out = np.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - (size - 1) // 2), min(channels - 1, c + -(-(size - 1) // 2))
        square_sum = (x[:, lo:hi + 1].astype(np.float64) ** 2).sum(1)
        out[:, c] = x[:, c] / (bias + alpha / size * square_sum) ** beta
    return out


_LRN = {"alpha": 0.3, "beta": 0.7, "bias": 1.5}


@pytest.mark.parametrize("size", [1, 3, 5, 9])
def test_lrn_matches_onnxruntime_and_trains(size):
    model = _model("LRN", 13, {}, {"x": _normal(2, 6, 4, 5)}, size=size, **_LRN)
    _agrees(model, {})
    _trains(model, ("x",))


@pytest.mark.parametrize("shape, size", [((2, 6, 4, 5), 2), ((2, 6, 4, 5), 4), ((2, 5, 7), 3),
                                         ((1, 4, 2, 3, 2), 2)])
def test_lrn_even_sizes_and_other_ranks_follow_the_spec(shape, size):
    """onnxruntime takes odd sizes and 4-D input only: an even window reaches one channel
    further up than down (torch's ``local_response_norm`` reaches down)."""
    x = _normal(*shape)
    got = ours(_model("LRN", 13, {"x": x}, size=size, **_LRN), {"x": x})[0]
    np.testing.assert_allclose(got, _lrn_reference(x, size, **_LRN), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset, axes", [(13, None), (9, [1, 2]), (13, [0, 1, 2, 3]),
                                         (13, [-1]), (13, [2, 3])])
def test_mean_variance_normalization_matches_onnxruntime_and_trains(opset, axes):
    attrs = {} if axes is None else {"axes": axes}
    model = _model("MeanVarianceNormalization", opset, {}, {"x": _normal(2, 3, 4, 5, scale=3)},
                   **attrs)
    _agrees(model, {})
    _trains(model, ("x",))


def test_mean_variance_normalization_adds_the_specs_epsilon_to_the_deviation():
    """The spec's function body divides by the deviation plus 1e-9: a slice of deviation 1e-9
    halves, a constant one (a dead ReLU channel) gives 0 with a finite gradient (onnxruntime's
    kernel omits the 1e-9: 0/0 there)."""
    x = _normal(1, 3, 2, 4)
    x[0, 1] = 2.5
    x[0, 2] = np.resize(np.array([0, 2e-9], F32), (2, 4))
    model = _model("MeanVarianceNormalization", 13, {}, {"x": x}, axes=[2, 3])
    module = st.from_onnx(model)
    out = module()
    assert float(out[0, 1].detach().abs().max()) == 0
    np.testing.assert_allclose(out[0, 2].detach().numpy(), np.resize([-0.5, 0.5], (2, 4)),
                               rtol=1e-5)
    out.mul(torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    assert bool(torch.isfinite(module.onnx_tensors()["x"].grad).all())


# ---- MaxUnpool, Col2Im, CenterCropPad -------------------------------------------------------
@pytest.mark.parametrize("opset", [9, 11, 22])
@pytest.mark.parametrize("kernel, strides, pads, shape", [
    ([2, 2], [2, 2], [0, 0, 0, 0], (2, 3, 6, 8)),
    ([3, 3], [2, 2], [1, 1, 1, 1], (2, 3, 5, 7)),
    ([2, 3], [1, 2], [0, 1, 1, 0], (1, 2, 4, 8)),
    ([3], [2], [1, 0], (2, 3, 10)),
])
@pytest.mark.parametrize("output_shape", [False, True])
def test_max_unpool_inverts_onnxruntime_max_pool(opset, kernel, strides, pads, shape,
                                                  output_shape):
    """Unpools MaxPool's values at its indices (over the whole tensor), at the size inferred
    from the attributes (here the pooled input's) or at ``output_shape``."""
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads}
    x = _normal(*shape)
    pooled, index = val.run(val.session(_pool_model(x, opset, attrs)), {"x": x}).values()
    feeds = {"x": pooled, "i": index}
    if output_shape:
        feeds["shape"] = np.array(shape, np.int64)
    expected = _agrees(_model("MaxUnpool", opset, feeds, **attrs), feeds)
    assert np.count_nonzero(expected) == np.unique(index).size


def _pool_model(x: np.ndarray, opset: int, attrs: dict) -> onnx.ModelProto:
    node = helper.make_node("MaxPool", ["x"], ["p", "i"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, x.shape)], [helper.make_empty_tensor_value_info(n)
                                                  for n in ("p", "i")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 12))])


_COL2IM = [
    ([4, 5], [2, 2], {}),
    ([5, 5], [2, 2], {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 0, 1]}),
    ([6, 4], [3, 1], {"strides": [3, 1], "pads": [0, 2, 0, 2]}),
    ([3, 3, 3], [2, 2, 2], {}),
    ([4, 3, 5], [2, 1, 3], {"strides": [2, 1, 1], "pads": [1, 0, 1, 1, 1, 0]}),
]


def _col2im_case(image: list[int], block: list[int], attrs: dict
                 ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    strides = attrs.get("strides", [1] * len(image))
    dil = attrs.get("dilations", [1] * len(image))
    pads = attrs.get("pads", [0] * 2 * len(image))
    blocks = np.prod([(i + pads[a] + pads[a + len(image)] - (d * (k - 1) + 1)) // s + 1
                      for a, (i, k, s, d) in enumerate(zip(image, block, strides, dil))])
    feeds = {"x": _normal(2, 3 * int(np.prod(block)), int(blocks)),
             "image": np.array(image, np.int64), "block": np.array(block, np.int64)}
    return _model("Col2Im", 18, feeds, **attrs), feeds


@pytest.mark.parametrize("image, block, attrs", _COL2IM)
def test_col2im_matches_onnxruntime(image, block, attrs):
    _agrees(*_col2im_case(image, block, attrs))


def test_col2im_3d_dilated_follows_the_onnx_reference():
    """onnxruntime's N-D Col2Im misplaces dilated columns (a 3-D image of depth 1 differs from
    its own 2-D answer); ONNX's reference implementation agrees with its 2-D kernel, and here."""
    model, feeds = _col2im_case([4, 3, 5], [2, 1, 3], {"strides": [2, 1, 1], "dilations": [
        1, 1, 2], "pads": [1, 0, 1, 1, 1, 0]})
    expected = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(ours(model, feeds)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, axes", [
    ([3, 8], [2, -1]),  # crop one axis, pad the other (an odd pixel each)
    ([1, 7, 4, 10], None),
    ([5], [1]),
    ([2, 6, 5, 7], None),  # unchanged
])
def test_center_crop_pad_matches_onnxruntime(shape, axes):
    feeds = {"x": _normal(2, 6, 5, 7), "shape": np.array(shape, np.int64)}
    _agrees(_model("CenterCropPad", 18, feeds, **({} if axes is None else {"axes": axes})),
            feeds)


# ---- DeformConv -----------------------------------------------------------------------------
def _deform_case(spatial: tuple[int, ...], kernel: tuple[int, ...], *, group: int = 1,
                 offset_group: int = 1, strides=None, pads=None, dilations=None,
                 mask: bool = False, bias: bool = False, scale: float = 1.5
                 ) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """DeformConv's inputs as initializers, its input names ("" for an omitted bias before a
    mask) and attributes: 4 input channels, 6 output ones, batch 2."""
    r = len(spatial)
    strides, dilations = strides or [1] * r, dilations or [1] * r
    pads = pads or [0] * 2 * r
    out = [(n + pads[i] + pads[i + r] - (d * (k - 1) + 1)) // s + 1
           for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations))]
    k = int(np.prod(kernel))
    consts = {"x": _normal(2, 4, *spatial), "w": _normal(6, 4 // group, *kernel),
              "offset": _normal(2, offset_group * k * r, *out, scale=scale)}
    names = ["x", "w", "offset", "", ""]
    if bias:
        consts["b"], names[3] = _normal(6), "b"
    if mask:
        consts["mask"], names[4] = RNG.random((2, offset_group * k, *out)).astype(F32), "mask"
    attrs = {"group": group, "offset_group": offset_group, "strides": strides, "pads": pads,
             "dilations": dilations, "kernel_shape": list(kernel)}
    return consts, [n for n in names if n] if not mask else names, attrs


_DEFORM_2D = [
    {},
    {"mask": True, "bias": True, "strides": [2, 1], "pads": [1, 0, 1, 2], "dilations": [1, 2],
     "offset_group": 2},
    {"group": 2, "offset_group": 2, "mask": True},
    {"group": 2, "offset_group": 4, "pads": [1, 1, 1, 1], "bias": True},
    {"scale": 5.0},  # most samples outside the image
]


@pytest.mark.parametrize("opset", [19, 22])
@pytest.mark.parametrize("options", _DEFORM_2D)
def test_deform_conv_matches_onnxruntime_and_trains(opset, options):
    consts, names, attrs = _deform_case((6, 7), (2, 3), **options)
    model = _model("DeformConv", opset, {}, consts, names=names, **attrs)
    _agrees(model, {})
    _trains(model, tuple(consts))


def _deform_reference(x, w, offset, b, mask, attrs) -> np.ndarray:
    """The spec's deformable convolution, one output at a time: N-linear samples at
    ``o·stride - pad + k·dilation + offset``, a corner outside the input counting zero."""
    n, c, *size = x.shape
    kernel, r = w.shape[2:], len(size)
    out_shape, k = offset.shape[2:], int(np.prod(w.shape[2:]))
    og, g = attrs["offset_group"], attrs["group"]
    offset = offset.reshape(n, og, k, r, *out_shape)
    mask = np.ones((n, og, k, *out_shape)) if mask is None else mask.reshape(n, og, k, *out_shape)
    y = np.zeros((n, w.shape[0], *out_shape))
    for b_, o in itertools.product(range(n), itertools.product(*map(range, out_shape))):
        cols = np.zeros((c, k))
        for j, kk in enumerate(itertools.product(*map(range, kernel))):
            for ch in range(c):
                grp = ch // (c // og)
                p = [o[i] * attrs["strides"][i] - attrs["pads"][i] + kk[i] * attrs["dilations"][i]
                     + offset[(b_, grp, j, i, *o)] for i in range(r)]
                value = 0.0
                for corner in itertools.product(*[(np.floor(q), np.floor(q) + 1) for q in p]):
                    weight = np.prod([1 - abs(q - v) for q, v in zip(p, corner)])
                    if all(0 <= v < s for v, s in zip(corner, size)):
                        value += weight * x[(b_, ch, *map(int, corner))]
                cols[ch, j] = value * mask[(b_, grp, j, *o)]
        for oc in range(w.shape[0]):
            grp = oc // (w.shape[0] // g)
            part = cols[grp * (c // g):(grp + 1) * (c // g)]
            y[(b_, oc, *o)] = (part * w[oc].reshape(c // g, k)).sum()
    return (y + (0 if b is None else b.reshape(1, -1, *[1] * r))).astype(F32)


@pytest.mark.parametrize("spatial, kernel, options", [
    ((7,), (3,), {"mask": True, "bias": True, "strides": [2], "pads": [1, 2], "offset_group": 2}),
    ((3, 4, 4), (2, 2, 1), {"group": 2, "offset_group": 2, "mask": True}),
    ((6, 7), (2, 3), _DEFORM_2D[1]),  # the reference itself, where onnxruntime checks it
])
def test_deform_conv_other_ranks_follow_the_spec(spatial, kernel, options):
    """onnxruntime's DeformConv is 2-D only; 1-D and 3-D follow the reference above."""
    consts, names, attrs = _deform_case(spatial, kernel, **options)
    got = ours(_model("DeformConv", 19, {}, consts, names=names, **attrs), {})[0]
    expected = _deform_reference(consts["x"], consts["w"], consts["offset"], consts.get("b"),
                                 consts.get("mask"), attrs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 against float64


# ---- RoiAlign, MaxRoiPool -------------------------------------------------------------------
_FEATURES = _normal(2, 3, 8, 9)
# inside, across the border, beyond it, thinner than a pixel, the whole map
_ROIS = np.array([[0.5, 0.5, 3, 2.5], [1.2, 0.3, 7.9, 7.5], [-2, -1.5, 4, 3], [6, 5, 12, 11],
                  [3, 3, 3.2, 3.1], [0, 0, 9, 8]], F32)
_BATCH = np.array([0, 1, 0, 1, 1, 0], np.int64)
_TRANSFORMS = {10: [None], 16: ["half_pixel", "output_half_pixel"]}


@pytest.mark.parametrize("opset, transform", [(o, t) for o, ts in _TRANSFORMS.items() for t in ts])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ratio, out, scale", [(0, (3, 4), 0.9), (2, (2, 2), 1.0),
                                               (1, (1, 3), 0.5), (3, (4, 2), 1.25)])
def test_roi_align_matches_onnxruntime_and_trains(opset, transform, mode, ratio, out, scale):
    """``sampling_ratio=0`` samples ceil(roi size / bins) per bin, per roi; ``max`` is
    onnxruntime's maximum of weighted corner terms."""
    attrs = {"mode": mode, "sampling_ratio": ratio, "output_height": out[0],
             "output_width": out[1], "spatial_scale": scale}
    if transform is not None:
        attrs["coordinate_transformation_mode"] = transform
    feeds = {"rois": _ROIS, "batch": _BATCH}
    model = _model("RoiAlign", opset, feeds, {"x": _FEATURES}, names=["x", "rois", "batch"],
                   **attrs)
    _agrees(model, feeds)
    _trains(model, ("x",), feeds)


def test_roi_align_samples_one_pixel_outside_count_clamped():
    """A sample exactly one pixel outside the map (-1, or the size) is clamped onto the
    border, not dropped: 1×1 bins of one sample, centred there."""
    feeds = {"x": _FEATURES, "rois": np.array([[-2, -2, 0, 0], [8, 7, 10, 9]], F32),
             "batch": np.array([0, 1], np.int64)}
    expected = _agrees(_model("RoiAlign", 16, feeds, sampling_ratio=1,
                              coordinate_transformation_mode="output_half_pixel"), feeds)
    np.testing.assert_allclose(expected[:, :, 0, 0], [_FEATURES[0, :, 0, 0],
                                                      _FEATURES[1, :, -1, -1]], rtol=1e-6)


def test_roi_align_at_opset_22_is_opset_16():
    """onnxruntime has no RoiAlign-22 (only its types grew): the opset-16 rules run."""
    feeds = {"x": _FEATURES, "rois": _ROIS, "batch": _BATCH}
    expected = _agrees(_model("RoiAlign", 16, feeds, mode="max"), feeds)
    np.testing.assert_array_equal(ours(_model("RoiAlign", 22, feeds, mode="max"), feeds)[0],
                                  expected)


@pytest.mark.parametrize("pooled, scale", [([2, 2], 1.0), ([3, 4], 0.5), ([1, 1], 1.5),
                                           ([4, 5], 1.0)])
@pytest.mark.parametrize("sign", [1, -1])
def test_max_roi_pool_matches_onnxruntime(pooled, scale, sign):
    """Rois rounded half away from zero (``round(2.5) = 3``), clipped to the map; negative
    features too (an all-negative bin keeps its maximum)."""
    rois = np.array([[0, 0.5, 0.5, 3, 2.5], [1, 1.2, 0.3, 7.9, 7.5], [0, -2, -1.5, 4, 3],
                     [1, 6, 5, 12, 11], [1, 3, 3, 3.2, 3.1], [0, 2.5, 1.5, 5.5, 6.5]], F32)
    feeds = {"x": sign * np.abs(_FEATURES), "rois": rois}
    _agrees(_model("MaxRoiPool", 1, feeds, pooled_shape=pooled, spatial_scale=scale), feeds)


# ---- NonMaxSuppression ----------------------------------------------------------------------
def _boxes(center: bool) -> np.ndarray:
    corner = RNG.uniform(0, 10, (2, 30, 2))
    extent = RNG.uniform(1, 4, (2, 30, 2))
    if center:
        return np.concatenate([corner + extent / 2, extent], -1).astype(F32)
    boxes = np.concatenate([corner[..., ::-1], (corner + extent)[..., ::-1]], -1).astype(F32)
    boxes[0, ::3] = boxes[0, ::3][:, [2, 3, 0, 1]]  # the other diagonal
    return boxes


@pytest.mark.parametrize("center", [0, 1])
@pytest.mark.parametrize("limits", [{}, {"max": 5}, {"max": 4, "iou": 0.3},
                                    {"max": 100, "iou": 0.2, "score": 0.4},
                                    {"max": 3, "iou": 0.0, "score": 0.1}],
                         ids=["defaults", "max", "iou", "all", "iou-0"])
def test_non_max_suppression_matches_onnxruntime(center, limits):
    feeds = {"boxes": _boxes(bool(center)), "scores": RNG.random((2, 3, 30)).astype(F32)}
    names = ["boxes", "scores"]
    for key, dtype in (("max", np.int64), ("iou", F32), ("score", F32)):
        if key in limits:
            feeds[key] = np.array([limits[key]], dtype)
        names.append(key if key in limits else "")
    while not names[-1]:
        names.pop()
    selected = _agrees(_model("NonMaxSuppression", 11, feeds, names=names,
                              center_point_box=center), feeds)
    assert selected.shape[1] == 3 and (len(selected) > 0) == ("max" in limits)


def test_non_max_suppression_keeps_a_box_at_exactly_the_threshold():
    """An IoU of exactly 0.5 does not exceed ``iou_threshold=0.5``; one just above does."""
    boxes = np.array([[[0, 0, 2, 2], [0, 0, 1, 2], [0, 0, 2, 1.0009766]]], F32)
    feeds = {"boxes": boxes, "scores": np.array([[[0.9, 0.8, 0.7]]], F32),
             "max": np.array([10], np.int64), "iou": np.array([0.5], F32)}
    selected = _agrees(_model("NonMaxSuppression", 11, feeds), feeds)
    assert selected[:, 2].tolist() == [0, 1]
