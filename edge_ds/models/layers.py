"""Linear layers the DeepSeek modules need beyond mlx.nn: per-head and per-expert stacks.

Each has a float form and a quantized form with mlx-lm's parameter names (weight, scales,
biases), so checkpoints in the mlx-lm layout load unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class HeadLinear(nn.Module):
    """Per-head matmul: x [B, H, L, in] -> [B, H, L, out] with weight [H, out, in].

    `transpose=False` applies the transposed map ([B, H, L, out] -> [B, H, L, in]), which
    MLA needs to use one weight both absorbed into the query and expanded into keys.
    """

    def __init__(self, input_dims: int, output_dims: int, num_heads: int):
        super().__init__()
        self.weight = mx.zeros((num_heads, output_dims, input_dims))

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return x @ (self.weight.swapaxes(-1, -2) if transpose else self.weight)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> "QuantizedHeadLinear":
        q = QuantizedHeadLinear(group_size, bits, mode)
        q.weight, q.scales, *b = mx.quantize(self.weight, group_size, bits, mode=mode)
        if b:
            q.biases = b[0]
        return q


class QuantizedHeadLinear(nn.Module):
    def __init__(self, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight = self.scales = mx.zeros((0,))
        if mode == "affine":
            self.biases = mx.zeros((0,))
        self.freeze()

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return mx.quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), transpose=transpose,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)


class ExpertLinear(nn.Module):
    """E stacked experts: x [..., 1 or k, 1, in] times weight[indices] -> [..., k, 1, out]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> "QuantizedExpertLinear":
        q = QuantizedExpertLinear(group_size, bits, mode)
        q.weight, q.scales, *b = mx.quantize(self.weight, group_size, bits, mode=mode)
        if b:
            q.biases = b[0]
        return q

    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        return self["weight"].astype(dtype)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight = self.scales = mx.zeros((0,))
        if mode == "affine":
            self.biases = mx.zeros((0,))
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)

    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        return mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                             bits=self.bits, mode=self.mode, dtype=dtype)
