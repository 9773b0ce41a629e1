"""Reading, normalising and writing ONNX models (over onnx-graphsurgeon)."""

from __future__ import annotations

from spa.ir.gslog import route_graphsurgeon_logs
from spa.ir.load import LoadedModel, load_model
from spa.ir.save import save_model, to_onnx

route_graphsurgeon_logs()

__all__ = ["LoadedModel", "load_model", "save_model", "to_onnx"]
