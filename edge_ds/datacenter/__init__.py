"""The datacenter leg: DeepSeek's FP8 serving numerics in PyTorch (never MLX).

    act_quant      activations -> e4m3 per token per 128 channels + float32 scales
    weight_dequant e4m3 weights with 128x128 block scales (ragged edges) -> float
    fp8_gemm       the block GEMM: float32 accumulation per 128-wide K block, bf16 out
    FP8Linear      an nn.Linear stand-in holding e4m3 weights and their scales

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
)

__all__ = ["BLOCK", "E4M3_MAX", "KERNELS", "FP8Experts", "FP8Linear", "act_quant", "fp8_gemm", "fp8_gemm_emulated",
           "weight_dequant"]
