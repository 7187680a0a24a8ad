"""DeepSeek-V3 style FP8 (e4m3) block scaling.

Weights are float8_e4m3fn with one float32 `scale_inv` per 128x128 block:
w[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]. The block size is the fixed
128 of the checkpoint format; it is never inferred from the shapes, because for
ragged shapes (rows not a multiple of 128) rows / scale_rows is not the block size
(transformers infers it that way and so gets ragged shapes wrong).
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np

from edge_ds.checkpoint import Checkpoint
from edge_ds.errors import EdgeDSError
from edge_ds.layout import fp8_scale_of

BLOCK = 128
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ACT_MIN_AMAX = 1e-4  # DeepSeek's act_quant clamps the tile amax to this


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _check_block(block: int) -> None:
    if not isinstance(block, (int, np.integer)) or block <= 0:
        raise ValueError(f"block must be a positive integer, got {block!r}")


def _apply_blocks(
    x: np.ndarray,
    factors: np.ndarray,
    row_block: int,
    col_block: int,
    op: Callable[..., np.ndarray],
) -> None:
    """In place: x[i, j] = op(x[i, j], factors[i // row_block, j // col_block]).

    x is a C-contiguous float32 [rows, cols]; factors is float32 [ceil(rows/rb), ceil(cols/cb)].
    Only a [rows, ceil(cols/cb)] copy of the factors is made (1/cb of x), never a full map.
    """
    rows, cols = x.shape
    per_row = np.repeat(factors, row_block, axis=0)[:rows]  # [rows, n_col_blocks]
    full = cols // col_block
    if full:
        # Splitting the contiguous last axis of a row slice is always a view, so this writes into x.
        body = x[:, : full * col_block].reshape(rows, full, col_block)
        op(body, per_row[:, :full, None], out=body)
    if cols % col_block:
        tail = x[:, full * col_block :]
        op(tail, per_row[:, full : full + 1], out=tail)


def _tile_amax(a: np.ndarray, row_block: int, col_block: int) -> np.ndarray:
    """max |a| over each row_block x col_block tile (ragged edge tiles included)."""
    a = np.abs(a)
    a = np.maximum.reduceat(a, np.arange(0, a.shape[0], row_block), axis=0)
    return np.maximum.reduceat(a, np.arange(0, a.shape[1], col_block), axis=1)


def dequantize_fp8_blocks(
    weight: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK, name: str = "weight"
) -> np.ndarray:
    """float8_e4m3fn [out, in] with scale_inv [ceil(out/block), ceil(in/block)] -> float32 [out, in]."""
    _check_block(block)
    weight = np.asarray(weight)
    scale_inv = np.asarray(scale_inv)
    if weight.dtype != FP8:
        raise EdgeDSError(f"{name}: expected a float8_e4m3fn weight, got {weight.dtype}")
    if weight.ndim != 2:
        raise EdgeDSError(f"{name}: expected a 2-D FP8 weight, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    expected = (_blocks(rows, block), _blocks(cols, block))
    if scale_inv.shape != expected:
        raise EdgeDSError(
            f"{name}: scale_inv shape {list(scale_inv.shape)} does not fit weight shape {list(weight.shape)}; "
            f"expected {list(expected)} ({block}x{block} blocks)"
        )
    out = weight.astype(np.float32)
    if out.size:
        _apply_blocks(out, scale_inv.astype(np.float32, copy=False), block, block, np.multiply)
    return out


def quantize_fp8_blocks(
    weight: np.ndarray, block: int = BLOCK, name: str = "weight"
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/b), ceil(in/b)]).

    Per block: scale = amax / 448 (1.0 for an all-zero block), q = fp8(w / scale),
    scale_inv = scale. Ragged edge blocks count as zero-padded, which leaves amax as is.
    """
    _check_block(block)
    w = np.array(weight, dtype=np.float32)  # a private copy: it is divided in place
    if w.ndim != 2:
        raise EdgeDSError(f"{name}: expected a 2-D weight to quantize, got shape {list(w.shape)}")
    rows, cols = w.shape
    if w.size == 0:
        return w.astype(FP8), np.ones((_blocks(rows, block), _blocks(cols, block)), np.float32)
    if not np.isfinite(w).all():
        raise EdgeDSError(f"{name}: has non-finite values; FP8 block scaling needs finite weights")
    amax = _tile_amax(w, block, block)
    scale = amax / np.float32(FP8_MAX)
    scale[amax == 0] = 1.0
    _apply_blocks(w, scale, block, block, np.divide)
    return w.astype(FP8), scale


def quantize_activations_fp8(
    x: np.ndarray, block: int = BLOCK, ue8m0: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's dynamic activation quantization, per token and per `block` channels.

    x [..., K] -> (float8_e4m3fn [..., K], float32 scales [..., ceil(K/block)]) with
    scale = max(tile amax, 1e-4) / 448 and q = fp8(x / scale); x ~= q * scale.
    A K that is not a multiple of `block` gives a narrower last tile.
    ue8m0=True rounds each scale up to a power of two (DeepSeek's "ue8m0" scale format).
    """
    _check_block(block)
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("expected activations with a channel axis, got a scalar")
    lead, k = x.shape[:-1], x.shape[-1]
    t = np.array(x, dtype=np.float32).reshape(-1, k)  # private copy, divided in place
    n_tiles = _blocks(k, block)
    if t.size == 0:
        return t.astype(FP8).reshape(x.shape), np.ones((*lead, n_tiles), np.float32)
    amax = _tile_amax(t, 1, block)
    scale = np.maximum(amax, np.float32(ACT_MIN_AMAX)) / np.float32(FP8_MAX)
    if ue8m0:
        scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    _apply_blocks(t, scale, 1, block, np.divide)
    return t.astype(FP8).reshape(x.shape), scale.reshape(*lead, n_tiles)


def read_float32(ckpt: Checkpoint, name: str) -> np.ndarray:
    """Tensor `name` of a Checkpoint as float32; an FP8 tensor is block-dequantized with its
    block-scale tensor (`<name>_scale_inv`), which must be there."""
    info = ckpt.info(name)
    w = ckpt.read(name)
    if info.dtype == "F8_E4M3":
        scale = fp8_scale_of(name)
        if scale not in ckpt:
            raise EdgeDSError(f"{info.path}: FP8 tensor '{name}' has no '{scale}'")
        w = dequantize_fp8_blocks(w, ckpt.read(scale).astype(np.float32), name=name)
    return np.asarray(w).astype(np.float32, copy=False)
