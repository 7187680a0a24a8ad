"""The datacenter leg: DeepSeek's FP8 serving numerics in PyTorch (never MLX).

    act_quant      activations -> e4m3 per token per 128 channels + float32 scales
    weight_dequant e4m3 weights with 128x128 block scales (ragged edges) -> float
    weight_quant   float weights -> e4m3 + block scales (DeepSeek's checkpoint layout)
    fp8_gemm       the block GEMM: float32 accumulation per 128-wide K block, bf16 out
    FP8Linear      an nn.Linear stand-in holding e4m3 weights and their scales
    io             TorchCheckpoint (read any checkpoint as torch tensors), write_fp8_checkpoint

Everything here imports torch only; a CUDA server with no MLX runs it (see reference
datacenter-fp8.md for the definition each function follows).
"""

from __future__ import annotations

from .fp8 import (
    BLOCK,
    E4M3_MAX,
    KERNELS,
    FP8Experts,
    FP8Linear,
    act_quant,
    fp8_gemm,
    fp8_gemm_emulated,
    weight_dequant,
    weight_quant,
)

__all__ = ["BLOCK", "E4M3_MAX", "KERNELS", "FP8Experts", "FP8Linear", "act_quant", "fp8_gemm", "fp8_gemm_emulated",
           "weight_dequant", "weight_quant", "write_fp8_checkpoint"]


def write_fp8_checkpoint(*args, **kwargs):
    """See datacenter.io.write_fp8_checkpoint (imported on use: it needs safetensors)."""
    from .io import write_fp8_checkpoint as write

    return write(*args, **kwargs)
