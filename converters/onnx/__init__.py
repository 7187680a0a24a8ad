"""Hugging Face DeepSeek checkpoint -> ONNX graph for onnxruntime (MatMulNBits, QMoE, latent cache)."""

from .export import MANIFEST, add_onnx_export, export_onnx, not_exportable

__all__ = ["MANIFEST", "add_onnx_export", "export_onnx", "not_exportable"]
