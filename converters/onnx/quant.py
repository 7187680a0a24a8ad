"""Symmetric block quantization in the layouts of onnxruntime's MatMulNBits and QMoE.

One float32 scale per `block_size` consecutive input features of an output row, no zero
points (the kernels then use 2^(bits-1): 8 for 4 bits, 128 for 8 bits):
w[n, k] = (q[n, k] - 2^(bits-1)) * scale[n, k // block_size].
4-bit values are packed two to a byte, the first element in the low nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockQuant:
    bits: int  # 4 or 8
    block_size: int  # 32, 64 or 128
    accuracy_level: int  # 0 (fp32 activations) or 4 (int8 activations)

    @property
    def levels(self) -> int:
        """Largest |q - zero|: the scale maps each block's absmax to it."""
        return (1 << (self.bits - 1)) - 1


def quantize_blocks(w: np.ndarray, q: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """w float [..., N, K] -> (packed uint8 [..., N, ceil(K/bs), bs*bits/8], scales float32 [..., N, ceil(K/bs)]).

    K is zero-padded to whole blocks (MatMulNBits' layout for a ragged K; the padding
    multiplies nothing, since the kernel only reads K inputs).
    """
    w = np.asarray(w, np.float32)
    *lead, n, k = w.shape
    bs = q.block_size
    blocks = -(-k // bs)
    padded = np.zeros((*lead, n, blocks * bs), np.float32)
    padded[..., :k] = w
    padded = padded.reshape(*lead, n, blocks, bs)
    amax = np.abs(padded).max(axis=-1)
    scales = (amax / q.levels).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    zero = 1 << (q.bits - 1)
    ints = np.clip(np.rint(padded / safe[..., None]), -q.levels, q.levels).astype(np.int16) + zero
    ints = ints.astype(np.uint8)
    if q.bits == 4:
        ints = ints[..., 0::2] | (ints[..., 1::2] << 4)
    return np.ascontiguousarray(ints), scales

