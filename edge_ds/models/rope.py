"""Interleaved rotary embedding with DeepSeek's YaRN frequency correction."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..config import YARN_TYPES, rope_type, yarn_mscale


def rope_inv_freq(dims: int, base: float, scaling: dict | None, max_position: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dims // 2] and the cos/sin multiplier, as transformers computes them.

    transformers applies the YaRN correction whatever the sequence length (the DeepSeek
    reference code only past original_max_position_embeddings); we match transformers.
    """
    pos = base ** (np.arange(0, dims, 2, dtype=np.float32) / dims)
    inv_freq = (1.0 / pos).astype(np.float32)
    if rope_type(scaling) not in YARN_TYPES:
        return inv_freq, 1.0

    factor = scaling.get("factor") or max_position / scaling["original_max_position_embeddings"]
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scaling.get("attention_factor") is not None:
        attention = float(scaling["attention_factor"])
    elif mscale and mscale_all:
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv_freq.astype(np.float32), float(attention)


class RoPE:
    """Rotates the first `dims` values of the last axis of x [B, H, L, *]: interleaved pairs
    (x0, x1), (x2, x3), ... (MLA), or with traditional=False the two halves (x_i, x_i+dims/2)
    (deepseek_v32's indexer)."""

    def __init__(self, dims: int, base: float, scaling: dict | None, max_position: int, traditional: bool = True):
        inv_freq, self.attention_factor = rope_inv_freq(dims, base, scaling, max_position)
        self.dims = dims
        self.traditional = traditional
        self._freqs = mx.array(1.0 / inv_freq)  # mx.fast.rope takes wavelengths

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.attention_factor != 1.0:
            x = x * self.attention_factor
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)


class TailRoPE:
    """DeepSeek-V4's rotary embedding: interleaved pairs on the LAST `dims` values of x [..., L, d]
    (each head is [nope | rope]), at explicit positions [L] (compressed entries sit at every m-th
    position). inverse=True rotates back by the same angles (V4 un-ropes its attention output)."""

    def __init__(self, dims: int, base: float, scaling: dict | None, max_position: int):
        inv_freq, self.attention_factor = rope_inv_freq(dims, base, scaling, max_position)
        self.dims = dims
        self.inv_freq = mx.array(inv_freq)  # [dims // 2]

    def __call__(self, x: mx.array, positions: mx.array, inverse: bool = False) -> mx.array:
        angles = positions.astype(mx.float32)[:, None] * self.inv_freq[None]  # [L, dims/2]
        cos, sin = mx.cos(angles) * self.attention_factor, mx.sin(angles) * self.attention_factor
        if inverse:
            sin = -sin
        nope, rope = x[..., : -self.dims], x[..., -self.dims:]
        pairs = rope.astype(mx.float32).reshape(*rope.shape[:-1], self.dims // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(rope.shape)
        return mx.concatenate([nope, rotated.astype(x.dtype)], axis=-1)
