"""Hugging Face DeepSeek checkpoint -> ONNX graph for onnxruntime (MatMulNBits, QMoE, latent cache)."""

from .export import MANIFEST, export_onnx

__all__ = ["MANIFEST", "export_onnx"]
