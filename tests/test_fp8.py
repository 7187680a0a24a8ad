"""converters.fp8 against explicit-loop oracles (the fixed 128 block rule, ragged edges)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from converters.fp8 import (
    BLOCK,
    dequantize_fp8_blocks,
    quantize_activations_fp8,
    quantize_fp8_blocks,
)
from edge_ds.errors import EdgeDSError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def decode_e4m3fn(byte: int) -> float:
    """float8_e4m3fn from its bits, by the spec: 1 sign, 4 exponent (bias 7), 3 mantissa, no inf."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def random_fp8(shape, rng) -> np.ndarray:
    bits = rng.integers(0, 256, size=shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x38  # no NaNs: replace with 1.0
    return bits.view(FP8)


def random_scales(shape, rng) -> np.ndarray:
    # distinct per block, across magnitudes, so any block mix-up changes the result
    return (rng.uniform(0.5, 2.0, size=shape) * 2.0 ** rng.integers(-12, 4, size=shape)).astype(np.float32)


def dequant_oracle(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w[i, j] * s[i // 128, j // 128] with plain Python loops and a bit-level fp8 decoder."""
    bits = weight.view(np.uint8).tolist()
    s = scale.tolist()
    rows, cols = weight.shape
    out = [[decode_e4m3fn(bits[i][j]) * s[i // 128][j // 128] for j in range(cols)] for i in range(rows)]
    # the float64 product of a 4-bit and a 24-bit significand is exact, so one rounding
    # to float32 here equals numpy's correctly rounded float32 multiply
    return np.array(out, dtype=np.float64).reshape(rows, cols).astype(np.float32)


def test_decoder_matches_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(FP8).astype(np.float64)
    got = np.array([decode_e4m3fn(int(c)) for c in codes])
    np.testing.assert_array_equal(got, want)  # NaN positions agree too


@pytest.mark.parametrize(
    "shape, scale_shape",
    [
        ((320, 256), (3, 2)),  # transformers raises: 320 / 3 is not an integer
        ((192, 256), (2, 2)),  # transformers silently uses 96-row blocks
        ((576, 300), (5, 3)),  # kv_a_proj_with_mqa rows; ragged columns as well
        ((128, 128), (1, 1)),
        ((5, 3), (1, 1)),
        ((129, 257), (2, 3)),
    ],
)
def test_dequantize_matches_loop_oracle(shape, scale_shape):
    rng = np.random.default_rng(sum(shape))
    w = random_fp8(shape, rng)
    s = random_scales(scale_shape, rng)
    w_before = w.copy()
    got = dequantize_fp8_blocks(w, s)
    assert got.dtype == np.float32 and got.shape == shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, dequant_oracle(w, s))
    assert np.array_equal(w.view(np.uint8), w_before.view(np.uint8))  # input untouched


def test_rows_128_to_191_use_scale_row_1():
    """[192, 256] with scale [2, 2]: blocks are 128 rows, not 192 / 2 = 96."""
    w = np.ones((192, 256), np.float32).astype(FP8)
    s = np.array([[1.0, 2.0], [10.0, 20.0]], np.float32)
    got = dequantize_fp8_blocks(w, s)
    assert (got[:128, :128] == 1.0).all() and (got[:128, 128:] == 2.0).all()
    assert (got[128:, :128] == 10.0).all() and (got[128:, 128:] == 20.0).all()
    # rows 96..127 are where the 96-row rule would wrongly use scale row 1
    assert (got[96:128, 0] == 1.0).all()


def test_last_ragged_block_uses_its_own_scale():
    w = np.ones((320, 300), np.float32).astype(FP8)
    s = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    got = dequantize_fp8_blocks(w, s)
    assert (got[256:, 256:] == 9.0).all() and (got[256:, :128] == 7.0).all() and (got[:128, 256:] == 3.0).all()


def test_deepseek_kv_a_shape_against_repeat_formula():
    rng = np.random.default_rng(7)
    w = random_fp8((576, 7168), rng)
    s = random_scales((5, 56), rng)
    full = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:576, :7168]
    np.testing.assert_array_equal(dequantize_fp8_blocks(w, s), w.astype(np.float32) * full)


@pytest.mark.parametrize("scale_shape", [(3, 2), (2, 1), (4, 4), (2,)])
def test_wrong_scale_shape(scale_shape):
    w = np.zeros((192, 256), FP8)
    with pytest.raises(EdgeDSError) as e:
        dequantize_fp8_blocks(w, np.ones(scale_shape, np.float32), name="model.layers.3.mlp.up_proj.weight")
    msg = str(e.value)
    assert "model.layers.3.mlp.up_proj.weight" in msg
    assert "[192, 256]" in msg and "[2, 2]" in msg and str(list(scale_shape)) in msg


def test_dequantize_rejects_non_fp8_and_non_2d():
    with pytest.raises(EdgeDSError, match="w.q: expected a float8_e4m3fn"):
        dequantize_fp8_blocks(np.zeros((4, 4), np.float32), np.ones((1, 1), np.float32), name="w.q")
    with pytest.raises(EdgeDSError, match="2-D"):
        dequantize_fp8_blocks(np.zeros((2, 4, 4), FP8), np.ones((1, 1), np.float32))


# --- weight quantization -----------------------------------------------------------


def quantize_oracle(w: np.ndarray, b: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """One block at a time, zero-padding ragged blocks to b x b as DeepSeek did."""
    rows, cols = w.shape
    nr, nc = -(-rows // b), -(-cols // b)
    q = np.zeros(w.shape, FP8)
    scale = np.zeros((nr, nc), np.float32)
    for bi in range(nr):
        for bj in range(nc):
            blk = w[bi * b : (bi + 1) * b, bj * b : (bj + 1) * b]
            padded = np.zeros((b, b), np.float32)
            padded[: blk.shape[0], : blk.shape[1]] = blk
            amax = np.abs(padded).max()
            s = np.float32(1.0) if amax == 0 else np.float32(amax) / np.float32(448.0)
            scale[bi, bj] = s
            q[bi * b : (bi + 1) * b, bj * b : (bj + 1) * b] = (blk / s).astype(FP8)
    return q, scale


def wide_range_weights(shape, rng) -> np.ndarray:
    # per-element magnitudes over 8 decades, so some blocks land in the fp8 subnormals
    mag = 10.0 ** rng.uniform(-8, 0, size=shape)
    return (rng.standard_normal(shape) * mag).astype(np.float32)


@pytest.mark.parametrize("shape", [(576, 300), (320, 256), (192, 256), (130, 129), (5, 3), (256, 128)])
def test_quantize_matches_block_loop(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    w = wide_range_weights(shape, rng)
    w[:128, :128] = 0.0  # an all-zero block: scale 1.0
    q, s = quantize_fp8_blocks(w)
    q_want, s_want = quantize_oracle(w)
    assert q.dtype == FP8 and q.shape == shape
    assert s.dtype == np.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert s[0, 0] == 1.0
    np.testing.assert_array_equal(s, s_want)
    np.testing.assert_array_equal(q.view(np.uint8), q_want.view(np.uint8))
    # each non-zero block's amax element lands on +-448, the top of the fp8 range
    q32 = q.astype(np.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            blk = q32[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            assert np.abs(blk).max() == (0.0 if (bi, bj) == (0, 0) else 448.0)


def test_round_trip_error_bound_is_tight():
    """|dequant(quant(w)) - w| within one fp8 rounding of w / s, plus float32 rounding.

    With s the block scale and y = fl32(w / s): fp8 e4m3 keeps 3 mantissa bits, so for
    normal |y| >= 2**-6 round-to-nearest errs by at most half an ulp, which relative to y
    is at most 2**-4 / (1 + 2**-4) = 1/17 (the worst case is y = 2**e * (1 + 1/16)).
    Below 2**-6 the spacing is 2**-9, so the error is at most 2**-10 absolute. Mapping
    back multiplies by s; the division and the multiply each add one float32 rounding
    (2**-24 relative), covered by the (1 + 2**-22) and 2**-22 * |w| terms.
    """
    rng = np.random.default_rng(11)
    w = wide_range_weights((576, 300), rng)
    w[300:, :] = rng.standard_normal((276, 300)).astype(np.float32)  # plain normal blocks too
    q, s = quantize_fp8_blocks(w)
    back = dequantize_fp8_blocks(q, s)
    s_full = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:576, :300].astype(np.float64)
    w64 = w.astype(np.float64)
    err = np.abs(back.astype(np.float64) - w64)
    bound = np.maximum(np.abs(w64) / 17, 2.0**-10 * s_full) * (1 + 2.0**-22) + 2.0**-22 * np.abs(w64)
    assert (err <= bound).all()

    # tight: the 1/17 relative term is nearly reached in the normal range ...
    normal = np.abs(w64) / s_full >= 2.0**-6
    assert (err[normal] / np.abs(w64[normal])).max() > 0.99 / 17
    # ... and the 2**-10 * s absolute term in the subnormal range
    sub = ~normal
    assert sub.sum() > 1000
    assert (err[sub] / s_full[sub]).max() > 0.99 * 2.0**-10
    # and the brief's looser statement holds: relative error <= 2**-4 for normal values
    assert (err[normal] <= 2.0**-4 * np.abs(w64[normal])).all()


def test_quantize_errors():
    with pytest.raises(EdgeDSError, match="lm.w"):
        quantize_fp8_blocks(np.array([[1.0, np.inf]], np.float32), name="lm.w")
    with pytest.raises(EdgeDSError, match="2-D"):
        quantize_fp8_blocks(np.zeros(4, np.float32))


def test_quantize_empty():
    q, s = quantize_fp8_blocks(np.zeros((0, 200), np.float32))
    assert q.shape == (0, 200) and s.shape == (0, 2)


# --- activation quantization -------------------------------------------------------


def act_oracle(x: np.ndarray, b: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
    k = flat.shape[1]
    nt = -(-k // b)
    q = np.zeros(flat.shape, FP8)
    scales = np.zeros((flat.shape[0], nt), np.float32)
    for t in range(flat.shape[0]):
        for j in range(nt):
            tile = flat[t, j * b : (j + 1) * b]
            amax = max(np.float32(np.abs(tile).max()), np.float32(1e-4))
            s = np.float32(amax) / np.float32(448.0)
            scales[t, j] = s
            q[t, j * b : (j + 1) * b] = (tile / s).astype(FP8)
    return q.reshape(x.shape), scales.reshape(*x.shape[:-1], nt)


def test_activation_quantization_per_tile_with_ragged_tile():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 4, 300)) * 10.0 ** rng.uniform(-3, 2, size=(3, 4, 1))).astype(np.float32)
    x[0, 0, 256:] = 1e-6  # the ragged 44-wide tile, below the 1e-4 clamp
    x[1, 2, :128] = 0.0
    q, s = quantize_activations_fp8(x)
    q_want, s_want = act_oracle(x)
    assert q.shape == (3, 4, 300) and q.dtype == FP8
    assert s.shape == (3, 4, 3) and s.dtype == np.float32
    np.testing.assert_array_equal(s, s_want)
    np.testing.assert_array_equal(q.view(np.uint8), q_want.view(np.uint8))
    clamp = np.float32(1e-4) / np.float32(448)
    assert s[0, 0, 2] == clamp and s[1, 2, 0] == clamp
    # the ragged tile's scale comes from its own 44 channels only
    t = x[2, 1, 256:]
    assert s[2, 1, 2] == np.float32(max(np.abs(t).max(), np.float32(1e-4))) / np.float32(448)
    # q * scale recovers x to fp8 precision (values above the clamp are normal in fp8)
    back = q.astype(np.float32) * np.repeat(s, 128, axis=-1)[..., :300]
    big = np.abs(x) >= 2.0**-6 * np.repeat(s, 128, axis=-1)[..., :300]
    assert (np.abs(back - x)[big] <= np.abs(x)[big] / 16).all()


def test_activation_quantization_1d_bf16_and_ue8m0():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(256).astype(ml_dtypes.bfloat16)
    q, s = quantize_activations_fp8(x)
    assert q.shape == (256,) and s.shape == (2,)
    np.testing.assert_array_equal(s, act_oracle(x)[1])
    q8, s8 = quantize_activations_fp8(x, ue8m0=True)
    mant, _ = np.frexp(s8)
    assert (mant == 0.5).all() and (s8 >= s).all() and (s8 < 2 * s).all()
    assert np.abs(q8.astype(np.float32)).max() <= 448
