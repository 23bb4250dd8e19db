"""Export of compact models: ONNX with checker and onnxruntime verification."""

from .onnx import ExportReport, export_onnx

__all__ = ["export_onnx", "ExportReport"]
