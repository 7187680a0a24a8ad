"""edge_ds.datacenter against an independent numpy/ml_dtypes implementation of DeepSeek's FP8
definition (reference/datacenter-fp8.md): act_quant bit for bit, the block GEMM to float32
rounding of a float64 product of the dequantized operands, weight_dequant bit for bit."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs the dev or torch extra")

from edge_ds.datacenter import (FP8Linear, act_quant, fp8_gemm, fp8_gemm_emulated, weight_dequant,  # noqa: E402
                                weight_quant)
from edge_ds.errors import EdgeDSError  # noqa: E402

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
B = 128


# --- the oracle ------------------------------------------------------------------------------

def act_oracle(x: np.ndarray, ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tile by tile with Python loops: amax = max(|tile|, 1e-4) in float32, s = amax / 448 in
    float32 (ue8m0: 2^ceil(log2 s), log2 in float64), q = e4m3(clip(tile / s, +-448)), RNE by
    ml_dtypes. x [T, K] float32 -> q [T, K] uint8 bits, s [T, ceil(K/128)] float32."""
    T, K = x.shape
    nt = -(-K // B)
    q = np.zeros((T, K), FP8)
    s = np.zeros((T, nt), np.float32)
    for t in range(T):
        for j in range(nt):
            tile = x[t, j * B:(j + 1) * B].astype(np.float32)
            amax = max(np.float32(np.abs(tile).max()), np.float32(1e-4))
            scale = np.float32(amax) / np.float32(448.0)
            if ue8m0:
                scale = np.float32(2.0 ** math.ceil(math.log2(float(scale))))
            s[t, j] = scale
            q[t, j * B:(j + 1) * B] = np.clip(tile / scale, np.float32(-448), np.float32(448)).astype(FP8)
    return q.view(np.uint8), s


def bits(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy()


def random_fp8(shape, rng) -> np.ndarray:
    b = rng.integers(0, 256, size=shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x38  # no NaNs
    return b.view(FP8)


def random_scales(shape, rng) -> np.ndarray:
    return (rng.uniform(0.5, 2.0, size=shape) * 2.0 ** rng.integers(-10, 3, size=shape)).astype(np.float32)


def to_torch_fp8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)


def wide(shape, rng) -> np.ndarray:
    """Values over many magnitudes per row, so subnormal e4m3 codes and every exponent occur."""
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 3, size=shape[:-1] + (1,))).astype(np.float32)


# --- act_quant ----------------------------------------------------------------------------

@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("K", [128, 512, 300])  # 300: a ragged 44-wide last tile
def test_act_quant_bit_identical(ue8m0, K):
    rng = np.random.default_rng(K + ue8m0)
    x = wide((37, K), rng)
    x[3, :] = 0.0  # all-zero row: every tile at the 1e-4 clamp
    x[5, :128] = 0.0  # one all-zero tile
    x[6, 128:] = 3e-6  # tiles below the clamp
    x[7, :] *= 1e6  # large magnitudes
    q, s = act_quant(torch.from_numpy(x), scale_fmt="ue8m0" if ue8m0 else None)
    q_want, s_want = act_oracle(x, ue8m0)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.shape == (37, K) and s.shape == (37, -(-K // 128))
    np.testing.assert_array_equal(s.numpy(), s_want)
    np.testing.assert_array_equal(bits(q), q_want)
    assert s[3].eq(np.float32(1e-4) / np.float32(448) if not ue8m0 else 2.0**-22).all()
    assert bits(q)[3].max() == 0 and bits(q)[5, :128].max() == 0
    if ue8m0:
        m, _ = np.frexp(s.numpy())
        assert (m == 0.5).all()


def test_act_quant_bf16_input_and_leading_dims():
    rng = np.random.default_rng(1)
    x = wide((2, 3, 256), rng).astype(ml_dtypes.bfloat16)
    xt = torch.from_numpy(x.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    q, s = act_quant(xt)
    q_want, s_want = act_oracle(x.astype(np.float32).reshape(6, 256))
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    np.testing.assert_array_equal(bits(q).reshape(6, 256), q_want)
    np.testing.assert_array_equal(s.numpy().reshape(6, 2), s_want)


def test_act_quant_448_boundary_and_saturation():
    """Tiles whose float32 amax/448 rounds down put amax/s just above 448: it must round (and
    saturate) to 448, the largest finite e4m3, never to NaN; exact multiples land on 448."""
    rng = np.random.default_rng(2)
    amax = rng.uniform(1, 1000, 20000).astype(np.float32)
    s = amax / np.float32(448)
    over = amax[(amax / s) > np.float32(448)]
    assert len(over) > 10  # the case exists and is exercised
    x = np.zeros((len(over), 128), np.float32)
    x[:, 0], x[:, 1] = over, -over
    x[:, 2] = over * np.float32(0.99)  # between e4m3 codes
    q, _ = act_quant(torch.from_numpy(x))
    qf = q.to(torch.float32).numpy()
    assert (qf[:, 0] == 448).all() and (qf[:, 1] == -448).all()
    np.testing.assert_array_equal(bits(q), act_oracle(x)[0])
    exact = np.zeros((1, 128), np.float32)
    exact[0, :3] = [448.0, 224.0, -448.0]  # s = 1: q is x itself
    q, s = act_quant(torch.from_numpy(exact))
    assert s.item() == 1.0 and q.to(torch.float32)[0, :3].tolist() == [448.0, 224.0, -448.0]


def test_act_quant_scale_fmt_checked():
    with pytest.raises(EdgeDSError, match="scale_fmt"):
        act_quant(torch.ones(1, 128), scale_fmt="e8m0")


# --- weight_dequant -----------------------------------------------------------------------

def dequant_oracle(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    out = np.empty(q.shape, np.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rs, cs = slice(bi * B, (bi + 1) * B), slice(bj * B, (bj + 1) * B)
            out[rs, cs] = q[rs, cs].astype(np.float32) * s[bi, bj]
    return out


@pytest.mark.parametrize("shape", [(256, 256), (320, 256), (192, 256), (576, 300), (5, 7)])
def test_weight_dequant_ragged_blocks(shape):
    """[192, 256] with scale [2, 2] is the shape transformers 5.23 dequantizes with 96-row blocks."""
    rng = np.random.default_rng(shape[0])
    q = random_fp8(shape, rng)
    s = random_scales((-(-shape[0] // B), -(-shape[1] // B)), rng)
    got = weight_dequant(to_torch_fp8(q), torch.from_numpy(s), torch.float32)
    np.testing.assert_array_equal(got.numpy(), dequant_oracle(q, s))
    bf = weight_dequant(to_torch_fp8(q), torch.from_numpy(s))  # one rounding float32 -> bf16
    np.testing.assert_array_equal(bf.float().numpy(),
                                  dequant_oracle(q, s).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_weight_dequant_wrong_scale_shape_names_tensor():
    with pytest.raises(EdgeDSError, match=r"q_b_proj.weight_scale_inv: shape \[3, 2\], expected \[2, 2\]"):
        weight_dequant(torch.zeros(192, 256).to(torch.float8_e4m3fn), torch.ones(3, 2),
                       name="q_b_proj.weight")


def quant_oracle(w: np.ndarray, ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per 128x128 block with loops: s = amax / 448 in float32 (1 for all-zero; ue8m0: 2^ceil(log2 s),
    log2 in float64), q = e4m3(w / s)."""
    s = np.ones((-(-w.shape[0] // B), -(-w.shape[1] // B)), np.float32)
    q = np.zeros(w.shape, FP8)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B]
            amax = np.float32(np.abs(blk).max())
            s[i, j] = amax / np.float32(448) if amax > 0 else np.float32(1)
            if ue8m0:
                s[i, j] = np.float32(2.0 ** math.ceil(math.log2(float(s[i, j]))))
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (blk / s[i, j]).astype(FP8)
    return q.view(np.uint8), s


@pytest.mark.parametrize("shape", [(256, 256), (576, 300), (192, 130), (5, 7)])
def test_weight_quant_bit_identical(shape):
    rng = np.random.default_rng(shape[1])
    w = wide(shape, rng)
    w[:128, :128] = 0.0  # an all-zero block: scale 1
    q, s = weight_quant(torch.from_numpy(w))
    q_want, s_want = quant_oracle(w)
    np.testing.assert_array_equal(s.numpy(), s_want)
    np.testing.assert_array_equal(bits(q), q_want)
    with pytest.raises(EdgeDSError, match="non-finite"):
        weight_quant(torch.tensor([[1.0, float("nan")]]), name="w")


@pytest.mark.parametrize("shape", [(256, 256), (192, 130)])
def test_weight_quant_ue8m0_bit_identical(shape):
    """DeepSeek-V4's power-of-two block scales: bit-identical to the loop oracle, exact in E8M0."""
    rng = np.random.default_rng(shape[0])
    w = wide(shape, rng)
    w[:128, :128] = 0.0
    w[128:, :128] *= np.float32(448 * 2.0**-3) / np.abs(w[128:, :128]).max()  # amax / 448 a power of two exactly
    q, s = weight_quant(torch.from_numpy(w), scale_fmt="ue8m0")
    q_want, s_want = quant_oracle(w, ue8m0=True)
    np.testing.assert_array_equal(s.numpy(), s_want)
    np.testing.assert_array_equal(bits(q), q_want)
    assert s[1, 0] == 2.0**-3 and s[0, 0] == 1.0
    np.testing.assert_array_equal(s.to(torch.float8_e8m0fnu).float().numpy(), s_want)
    with pytest.raises(EdgeDSError, match="scale_fmt"):
        weight_quant(torch.ones(2, 2), name="w", scale_fmt="e5m2")


@pytest.mark.parametrize("name,want", [
    ("model.layers.0.self_attn.q_a_proj.weight", True),
    ("model.layers.0.self_attn.q_b_proj.weight", True),
    ("model.layers.0.self_attn.kv_proj.weight", True),
    ("model.layers.0.self_attn.o_a_proj.weight", True),
    ("model.layers.0.self_attn.o_b_proj.weight", True),
    ("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight", True),
    ("model.layers.0.mlp.experts.3.gate_proj.weight", True),
    ("model.layers.0.mlp.shared_experts.down_proj.weight", True),
    # BF16 in DeepSeek's V4 release: the compressor's and indexer's pooling projections, weights_proj
    ("model.layers.1.self_attn.compressor.kv_proj.weight", False),
    ("model.layers.1.self_attn.compressor.gate_proj.weight", False),
    ("model.layers.1.self_attn.compressor.indexer.kv_proj.weight", False),
    ("model.layers.1.self_attn.compressor.indexer.gate_proj.weight", False),
    ("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight", False),
    ("model.layers.0.mlp.gate.weight", False),
    ("model.layers.0.attn_hc.fn", False),
    ("model.hc_head.hc_fn", False),
    ("model.embed_tokens.weight", False),
    # V3.2's names as before
    ("model.layers.1.self_attn.indexer.wq_b.weight", True),
    ("model.layers.1.self_attn.indexer.weights_proj.weight", False),
])
def test_fp8_targets_of_v4(name, want):
    from edge_ds.datacenter.io import is_fp8_target

    assert is_fp8_target(name, (256, 256)) is want


def test_fp8_experts_clamp_at_swiglu_limit():
    """FP8Experts(limit): each routed token's down(silu(min(gate, limit)) * clip(up, +-limit)) times its
    weight, summed per token; the expert products are the (separately tested) FP8 linears."""
    from edge_ds.datacenter import FP8Experts

    rng = np.random.default_rng(7)
    E, D, I, T, k, limit = 3, 160, 96, 6, 2, 0.05

    def linear(n, m):
        return FP8Linear(to_torch_fp8(random_fp8((n, m), rng)), torch.from_numpy(random_scales((-(-n // B), -(-m // B)), rng) * 1e-2))

    experts = [(linear(I, D), linear(I, D), linear(D, I)) for _ in range(E)]
    x = torch.from_numpy(wide((T, D), rng))
    idx = torch.from_numpy(rng.permuted(np.tile(np.arange(E), (T, 1)), axis=1)[:, :k].copy())
    w = torch.from_numpy(rng.uniform(0.1, 1.0, (T, k)).astype(np.float32))
    got = FP8Experts(experts, torch.nn.functional.silu, limit)(x, idx, w)
    want = torch.zeros(T, D)
    clamped = False
    for t in range(T):
        for j in range(k):
            g, u, d = experts[int(idx[t, j])]
            gate, up = g(x[t:t + 1]), u(x[t:t + 1])
            clamped |= bool((gate > limit).any() or (up.abs() > limit).any())
            h = torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
            want[t] += (d(h) * w[t, j])[0]
    assert clamped  # the limit is reached, so the test sees it
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    unclamped = FP8Experts(experts, torch.nn.functional.silu)(x, idx, w)
    assert not torch.allclose(unclamped, want, rtol=1e-3, atol=1e-4)


# --- the block GEMM -----------------------------------------------------------------------

def gemm_reference(qa, sa, qw, sw) -> tuple[np.ndarray, np.ndarray]:
    """float64 (x_deq @ w_deq^T) and sum |x_deq| |w_deq|^T (the scale of float32 rounding)."""
    M, K = qa.shape
    N = qw.shape[0]
    a = qa.view(FP8).astype(np.float64) * np.repeat(sa.astype(np.float64), B, axis=1)[:, :K]
    w = qw.view(FP8).astype(np.float64) * np.repeat(np.repeat(sw.astype(np.float64), B, 0), B, 1)[:N, :K]
    return a @ w.T, np.abs(a) @ np.abs(w).T


@pytest.mark.parametrize("M,N,K", [(7, 256, 512), (33, 200, 300), (1, 576, 7 * 128)])
def test_block_gemm_equals_float64_reference(M, N, K):
    rng = np.random.default_rng(M * N)
    x = wide((M, K), rng)
    qa_bits, sa = act_oracle(x)
    qw = random_fp8((N, K), rng)
    sw = random_scales((-(-N // B), -(-K // B)), rng)
    qa_t, sa_t = act_quant(torch.from_numpy(x))
    got = fp8_gemm_emulated(qa_t, sa_t, to_torch_fp8(qw), torch.from_numpy(sw), torch.float32).double().numpy()
    want, mag = gemm_reference(qa_bits, sa, qw.view(np.uint8), sw)
    # float32 rounding: at most (128 + blocks + 2) roundings of relative size 2^-24 on sum |terms|
    bound = (B + -(-K // B) + 2) * 2.0**-24 * mag
    err = np.abs(got - want)
    assert (err <= bound).all(), float((err / np.maximum(mag, 1e-300)).max())
    # ... and the bound is tight enough to see a wrong block: scales of the next K block
    wrong = fp8_gemm_emulated(qa_t, sa_t.roll(1, dims=1), to_torch_fp8(qw), torch.from_numpy(sw), torch.float32)
    if K > B:
        assert (np.abs(wrong.double().numpy() - want) > bound).any()
    # the default output is that float32 result rounded once to bf16
    bf = fp8_gemm(qa_t, sa_t, to_torch_fp8(qw), torch.from_numpy(sw), kernel="emulated")
    assert bf.dtype == torch.bfloat16
    np.testing.assert_array_equal(bf.float().numpy(), torch.from_numpy(got).float().bfloat16().float().numpy())


def test_fp8_linear_against_oracle():
    rng = np.random.default_rng(4)
    x = wide((2, 5, 300), rng)
    qw = random_fp8((200, 300), rng)
    sw = random_scales((2, 3), rng)
    lin = FP8Linear(to_torch_fp8(qw), torch.from_numpy(sw), scale_fmt="ue8m0")
    y = lin(torch.from_numpy(x))
    assert y.shape == (2, 5, 200) and y.dtype == torch.float32
    qa, sa = act_oracle(x.reshape(10, 300), ue8m0=True)
    want, mag = gemm_reference(qa, sa, qw.view(np.uint8), sw)
    # bf16 output: half an ulp of bf16 (2^-9 relative) plus the float32 accumulation
    err = np.abs(y.double().numpy().reshape(10, 200) - want)
    assert (err <= 2.0**-8 * np.abs(want) + 140 * 2.0**-24 * mag).all()


@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (7, 2048, 7168), (33, 576, 7168), (16, 208, 304)])  # 208, 304: ragged blocks
def test_scaled_mm_arguments_pass_torchs_own_checks(M, N, K):
    """The blockwise _scaled_mm call, made on meta tensors: torch's meta kernel checks layouts
    (row-major activations, column-major weights) and the 1x128 x 128x128 scale shapes."""
    from edge_ds.datacenter import fp8

    meta = dict(device="meta")
    out = fp8._scaled_mm(torch.empty(M, K, dtype=torch.float8_e4m3fn, **meta),
                         torch.empty(M, -(-K // 128), **meta),
                         torch.empty(N, K, dtype=torch.float8_e4m3fn, **meta),
                         torch.empty(-(-N // 128), -(-K // 128), **meta))
    assert out.shape == (M, N) and out.dtype == torch.bfloat16


def test_kernel_choice_checks_the_gpu_kernel_first(monkeypatch):
    """With a (faked) SM90 device: a kernel that agrees with the emulation serves the calls, one
    that disagrees or raises is never used, and each weight shape says why."""
    from edge_ds.datacenter import fp8

    rng = np.random.default_rng(8)
    qa, sa = act_quant(torch.from_numpy(wide((4, 256), rng)))
    ws = {n: (to_torch_fp8(random_fp8((n, 256), rng)), torch.from_numpy(random_scales((-(-n // 128), 2), rng)))
          for n in (128, 144, 160)}
    behaviours = {128: lambda a, b, c, d: fp8_gemm_emulated(a, b, c, d),
                  144: lambda a, b, c, d: fp8_gemm_emulated(a, b, c, d) * 1.01,
                  160: lambda a, b, c, d: (_ for _ in ()).throw(RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED"))}
    monkeypatch.setattr(fp8, "_sm90", lambda t: True)
    monkeypatch.setattr(fp8, "_scaled_mm", lambda a, b, c, d: behaviours[c.shape[0]](a, b, c, d))
    monkeypatch.setattr(fp8, "_SCALED_MM_OK", {})
    monkeypatch.setattr(fp8, "KERNELS", fp8.Counter())
    for n, (qw, sw) in ws.items():
        for _ in range(2):
            got = fp8_gemm(qa, sa, qw, sw)
            assert torch.equal(got, fp8_gemm_emulated(qa, sa, qw, sw))
    status = fp8.scaled_mm_status()
    assert status["cpu [128x256]"] == "used" and status["cpu [144x256]"].startswith("disagrees")
    assert status["cpu [160x256]"].startswith("unavailable (CUBLAS_STATUS_NOT_SUPPORTED")
    assert fp8.KERNELS == {"scaled_mm_blockwise": 2, "emulated": 4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (CI has none)")
def test_cuda_fp8_gemm_matches_cpu_emulation():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(wide((64, 512), rng))
    qw, sw = to_torch_fp8(random_fp8((256, 512), rng)), torch.from_numpy(random_scales((2, 4), rng))
    qa, sa = act_quant(x)
    qa_c, sa_c = act_quant(x.cuda())
    assert np.array_equal(bits(qa_c.cpu()), bits(qa))  # activation quantization is bit-identical on the GPU
    assert torch.equal(sa_c.cpu(), sa)
    cpu = fp8_gemm_emulated(qa, sa, qw, sw, torch.float32)
    gpu = fp8_gemm(qa_c, sa_c, qw.cuda(), sw.cuda()).float().cpu()
    d = 1 - 2 * (cpu.double() * gpu.double()).sum() / (cpu.double() ** 2 + gpu.double() ** 2).sum()
    assert d < 1e-3
