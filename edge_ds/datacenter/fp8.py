"""DeepSeek's FP8 inference numerics (DeepSeek-V3 `inference/kernel.py`), in torch.

Weights stay float8_e4m3fn with one float32 multiplier per 128x128 block (`weight_scale_inv`,
[ceil(N/128), ceil(K/128)]; edge blocks may be partial). The input of every FP8 linear is
quantized on the fly per token per 128 channels: amax clamped below at 1e-4, s = amax / 448
(rounded up to a power of two with scale_fmt "ue8m0"), q = e4m3(x / s), round to nearest even,
saturating at 448. The GEMM sums each 128-wide K block's e4m3 products in float32, multiplies
the block result by (activation tile scale) then (weight block scale), sums the blocks in
float32 and writes bfloat16.

Two kernels compute that GEMM:
  "scaled_mm_blockwise"  torch._scaled_mm with 1x128 x 128x128 float32 scales (CUDA SM90 only;
                         checked once per shape against the emulation before it is trusted)
  "emulated"             any device: the e4m3 operands decoded to float32 (exact), one float32
                         matmul per K block, scaled and summed as DeepSeek's kernel does
KERNELS counts the calls each kernel served, so a run can report which one ran.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import nn

from ..errors import EdgeDSError

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
KERNELS: Counter = Counter()  # kernel name -> FP8 GEMM calls it served
_SCALED_MM_OK: dict[tuple, bool | str] = {}  # (device, N, K) -> True, or why the emulation runs instead


def _blocks(n: int, block: int = BLOCK) -> int:
    return -(-n // block)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive float32 s, exactly (frexp, not a float log2 that can round)."""
    mantissa, exponent = torch.frexp(s)  # s = m * 2^e, m in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # already a power of two: keep it
    return torch.ldexp(torch.ones_like(s), exponent)


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (any float dtype) -> (q float8_e4m3fn [..., K], s float32 [..., ceil(K/block)]).

    x ~= q * s tile by tile. A ragged last tile is scaled from its own channels (DeepSeek's
    kernel asserts K % 128 == 0; zero padding leaves amax unchanged, so this extends it)."""
    if scale_fmt not in (None, "ue8m0"):
        raise EdgeDSError(f"scale_fmt must be null or 'ue8m0', got {scale_fmt!r}")
    K = x.shape[-1]
    tiles = _blocks(K, block_size)
    xf = x.to(torch.float32)
    if tiles * block_size != K:
        xf = nn.functional.pad(xf, (0, tiles * block_size - K))
    t = xf.reshape(*x.shape[:-1], tiles, block_size)
    amax = t.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    s = amax / E4M3_MAX  # float32 division, as the kernel's `amax / 448.`
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    # x / s, not x * (1/s): the kernel divides. Clamping first is the cast's saturation
    # (cvt.rn.satfinite); without it torch would turn values past 464 into NaN.
    q = (t / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*x.shape[:-1], tiles * block_size)[..., :K]
    return q, s


def _check_scale(weight: torch.Tensor, scale: torch.Tensor, name: str) -> None:
    if weight.dim() != 2:
        raise EdgeDSError(f"{name}: an FP8 weight must be 2-D, got shape {list(weight.shape)}")
    want = (_blocks(weight.shape[0]), _blocks(weight.shape[1]))
    if tuple(scale.shape) != want:
        raise EdgeDSError(f"{name}_scale_inv: shape {list(scale.shape)}, expected {list(want)} for the weight "
                          f"{list(weight.shape)} in 128x128 blocks")


def _expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] -> [rows, cols], each block's value over its (partial) block."""
    return scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def weight_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   name: str = "weight") -> torch.Tensor:
    """e4m3 weight [N, K] x float32 scale [ceil(N/128), ceil(K/128)] -> dtype [N, K].

    w[i, j] = float(q[i, j]) * scale[i // 128, j // 128] in float32 (exact: 4-bit x 24-bit
    significands), then one rounding to dtype, as DeepSeek's weight_dequant kernel stores it."""
    _check_scale(weight, scale, name)
    return (weight.to(torch.float32) * _expand_scale(scale.to(torch.float32), *weight.shape)).to(dtype)


def weight_quant(w: torch.Tensor, name: str = "weight", scale_fmt: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (e4m3 [N, K], float32 scale_inv [ceil(N/128), ceil(K/128)]), the layout of
    DeepSeek's FP8 checkpoints: per 128x128 block (ragged edges as they are) s = amax / 448 in
    float32 (1 for an all-zero block), q = e4m3(w / s) rounded to nearest even. scale_fmt "ue8m0"
    (DeepSeek-V4's checkpoints): s rounded up to a power of two, 2^ceil(log2(amax / 448))."""
    if scale_fmt not in (None, "ue8m0"):
        raise EdgeDSError(f"{name}: scale_fmt must be null or 'ue8m0', got {scale_fmt!r}")
    if w.dim() != 2:
        raise EdgeDSError(f"{name}: only 2-D weights are FP8 blocks, got shape {list(w.shape)}")
    w = w.to(torch.float32)
    if not torch.isfinite(w).all():
        raise EdgeDSError(f"{name}: has non-finite values; FP8 block scaling needs finite weights")
    N, K = w.shape
    nb, kb = _blocks(N), _blocks(K)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w  # zero padding leaves every block's amax as it is
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.where(amax == 0, torch.ones_like(amax), amax / E4M3_MAX)
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    q = (blocks / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * BLOCK, kb * BLOCK)[:N, :K].contiguous(), s


def fp8_gemm_emulated(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """qa e4m3 [M, K], sa float32 [M, ceil(K/128)], qw e4m3 [N, K], sw float32 [ceil(N/128), ceil(K/128)]
    -> [M, N] out_dtype. Per K block j: (qa_j @ qw_j^T in float32) * sa[:, j] * sw[n // 128, j],
    summed over j in float32 (DeepSeek's fp8_gemm_kernel, one K block at a time)."""
    M, K = qa.shape
    N = qw.shape[0]
    kt = _blocks(K)
    a = qa.to(torch.float32)  # e4m3 -> float32 is exact
    w = qw.to(torch.float32)
    if kt * BLOCK != K:  # zero columns add nothing to any block's sum
        a = nn.functional.pad(a, (0, kt * BLOCK - K))
        w = nn.functional.pad(w, (0, kt * BLOCK - K))
    sw_rows = sw.to(torch.float32).repeat_interleave(BLOCK, 0)[:N]  # [N, K blocks]
    out = torch.zeros(M, N, dtype=torch.float32, device=qa.device)
    # All blocks in one batched matmul when the [blocks, M, N] partial sums are small (many
    # small matmuls are slow on a CPU), else one block at a time; either way each block's sum
    # is float32, scaled, then added to the float32 total in block order.
    step = max(1, min(kt, (1 << 24) // max(1, M * N)))
    for j0 in range(0, kt, step):
        j1 = min(kt, j0 + step)
        parts = torch.bmm(a[:, j0 * BLOCK:j1 * BLOCK].reshape(M, j1 - j0, BLOCK).transpose(0, 1),
                          w[:, j0 * BLOCK:j1 * BLOCK].reshape(N, j1 - j0, BLOCK).permute(1, 2, 0))  # [blocks, M, N]
        for j in range(j0, j1):
            out += parts[j - j0] * sa[:, j : j + 1] * sw_rows[:, j]
    return out.to(out_dtype)


def _scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """torch._scaled_mm with (BlockWise1x128, BlockWise128x128) float32 scales -> bf16 [M, N].
    Layouts as torch's own blockwise tests: activation scales outer-dim-major ([M, K/128]
    column-major), weight scales as the transposed view of [N/128, K/128]."""
    return torch._scaled_mm(qa, qw.t(), scale_a=sa.t().contiguous().t(), scale_b=sw.t(), out_dtype=torch.bfloat16)


def _diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity check: 1 - 2 sum(xy) / sum(x^2 + y^2) (FP8 passes below 1e-3)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def _sm90(t: torch.Tensor) -> bool:
    """Whether `t` lives on a Hopper GPU (compute capability 9.0), where cuBLASLt has blockwise FP8."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0)


def _scaled_mm_usable(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> bool:
    """Whether torch's blockwise _scaled_mm serves this (device, N, K): SM90, 16-aligned dims, and
    the first call's result agrees with the emulation to DeepGEMM's similarity measure below
    1e-5 (upstream once returned wrong numbers silently for some scale layouts; a wrong kernel
    must not become the reference)."""
    N, K = qw.shape
    key = (str(qa.device), N, K)
    if key not in _SCALED_MM_OK:
        if not _sm90(qa):
            _SCALED_MM_OK[key] = "not an SM90 GPU"
        elif K % 16 or N % 16:
            _SCALED_MM_OK[key] = "dimensions not multiples of 16"
        else:
            try:
                got = _scaled_mm(qa, sa, qw, sw)
                want = fp8_gemm_emulated(qa, sa, qw, sw)
                d = _diff(got, want)
                # Both round the same float32 sums to bf16: a correct kernel differs by an
                # occasional ulp (diff well under 1e-5); a 1% error anywhere gives 5e-5.
                _SCALED_MM_OK[key] = True if d < 1e-5 else f"disagrees with the emulation (diff {d:.2e})"
            except (RuntimeError, NotImplementedError) as e:
                _SCALED_MM_OK[key] = f"unavailable ({str(e).splitlines()[0][:120]})"
    return _SCALED_MM_OK[key] is True


def scaled_mm_status() -> dict[str, str]:
    """Why each (device, N, K) the blockwise _scaled_mm was considered for does or does not use it."""
    return {f"{d} [{n}x{k}]": ("used" if v is True else v) for (d, n, k), v in _SCALED_MM_OK.items()}


def fp8_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, kernel: str = "auto"
             ) -> torch.Tensor:
    """The block GEMM -> bf16 [M, N] (shapes as fp8_gemm_emulated). kernel "auto": torch's
    blockwise _scaled_mm where it applies, else the emulation; "emulated" forces the latter."""
    if kernel == "auto" and _scaled_mm_usable(qa, sa, qw, sw):
        try:
            out = _scaled_mm(qa, sa, qw, sw)
            KERNELS["scaled_mm_blockwise"] += 1
            return out
        except RuntimeError as e:  # a row count the first call did not have (cuBLASLt's own limits)
            _SCALED_MM_OK[(str(qa.device), *qw.shape)] = f"failed for {qa.shape[0]} rows ({str(e).splitlines()[0][:120]})"
    KERNELS["emulated"] += 1
    return fp8_gemm_emulated(qa, sa, qw, sw)


class FP8Linear(nn.Module):
    """y = x W^T with W e4m3 [out, in] and its 128x128 block scales, DeepSeek's `linear` with
    gemm_impl "fp8": activations quantized per token per 128 channels, block GEMM, bf16 output
    (returned in x's dtype)."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 scale_fmt: str | None = None, kernel: str = "auto", name: str = "weight"):
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn:
            raise EdgeDSError(f"{name}: an FP8 linear needs a float8_e4m3fn weight, got {weight.dtype}")
        _check_scale(weight, scale_inv, name)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale_inv.to(torch.float32).contiguous())
        self.register_buffer("bias", bias)
        self.scale_fmt = scale_fmt
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        flat = x.reshape(-1, self.in_features)
        qa, sa = act_quant(flat, BLOCK, self.scale_fmt)
        y = fp8_gemm(qa, sa, self.weight, self.weight_scale_inv, self.kernel)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale_fmt={self.scale_fmt}"


class FP8Experts(nn.Module):
    """Routed experts as FP8 linears; the call of transformers' DeepseekV3Experts:
    (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]. `limit` (DeepSeek-V4's
    swiglu_limit): gate clamped above at limit and up to [-limit, limit] before act(gate) * up."""

    def __init__(self, experts: list[tuple[FP8Linear, FP8Linear, FP8Linear]], act: Callable[[torch.Tensor], torch.Tensor],
                 limit: float | None = None):
        super().__init__()
        self.gate = nn.ModuleList(e[0] for e in experts)
        self.up = nn.ModuleList(e[1] for e in experts)
        self.down = nn.ModuleList(e[2] for e in experts)
        self.num_experts = len(experts)
        self.act_fn = act
        self.limit = limit

    def _glu(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate[e](x), self.up[e](x)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(min=-self.limit, max=self.limit)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            y = self.down[e](self._glu(e, x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out
