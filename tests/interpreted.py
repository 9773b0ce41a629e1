"""One model run both ways, for the ``test_from_onnx_*`` op tests: by ``spa.torch.from_onnx``
(:func:`ours`) and by onnxruntime (:func:`theirs`), every output as a numpy array, in order."""

from __future__ import annotations

import numpy as np
import onnx
import torch

import spa.torch as st
from spa import validate as val


def ours(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The interpreted module's outputs (``feeds`` in the graph's input order)."""
    with torch.no_grad():
        got = st.from_onnx(model)(*[torch.from_numpy(v) for v in feeds.values()])
    return [t.numpy() for t in (got if isinstance(got, tuple) else (got,))]


def theirs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's outputs."""
    return list(val.run(val.session(model), feeds).values())
