"""Linear layers the DeepSeek modules need beyond mlx.nn: per-head and per-expert stacks.

Each has a float form and a quantized form with mlx-lm's parameter names (weight, scales,
biases), so checkpoints in the mlx-lm layout load unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class _Quantized(nn.Module):
    """weight (packed uint32), scales and, for affine, biases: mlx-lm's names."""

    def __init__(self, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight = self.scales = mx.zeros((0,))
        if mode == "affine":
            self.biases = mx.zeros((0,))
        self.freeze()

    def set_weight(self, weight: mx.array) -> "_Quantized":
        self.weight, self.scales, *b = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        if b:
            self.biases = b[0]
        return self


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
        return QuantizedHeadLinear(group_size, bits, mode).set_weight(self.weight)


class QuantizedHeadLinear(_Quantized):
    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        if dense_prefill(x.shape[-2]):
            w = unpack(self, x.dtype)
            return x @ (w.swapaxes(-1, -2) if transpose else w)
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

    def expert_weight(self, e: int, dtype: mx.Dtype) -> mx.array:
        """Expert e's float weight [out, in]."""
        return self["weight"][e].astype(dtype)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> "QuantizedExpertLinear":
        return QuantizedExpertLinear(group_size, bits, mode).set_weight(self.weight)


class QuantizedExpertLinear(_Quantized):
    def expert_weight(self, e: int, dtype: mx.Dtype) -> mx.array:
        """Expert e's weight unpacked to float [out, in]."""
        return unpack(self, dtype, expert=e)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)


# --- CPU prefill ----------------------------------------------------------------------
# MLX's CPU quantized matmul is slow once there are many rows, while a dense float32 matmul
# goes through BLAS. So for prefill on the CPU backend we unpack the weights to float32 (a
# fused, compiled kernel) and multiply densely; decode (one row) keeps the quantized kernel,
# which reads 4x fewer bytes. The same cutoff makes a lazy-expert call prefill (experts/switch.py).
PREFILL_ROWS = 16


def dense_prefill(rows: int) -> bool:
    return rows >= PREFILL_ROWS and mx.default_device() == mx.cpu


@mx.compile
def _unpack_affine(w: mx.array, scales: mx.array, biases: mx.array, shifts: mx.array, mask: mx.array) -> mx.array:
    per_word = shifts.size
    q = (w[..., None] >> shifts) & mask  # [..., in / per_word, per_word]
    q = q.reshape(*scales.shape, -1).astype(scales.dtype)  # [..., groups, group_size]
    return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)


def unpack(module: nn.Module, dtype: mx.Dtype, expert: int | None = None) -> mx.array:
    """Float weights of a quantized module (same values as mx.dequantize, faster on CPU);
    `expert` picks one expert of a stacked module."""
    w, scales, biases = module["weight"], module["scales"], module.get("biases")
    if expert is not None:
        w, scales, biases = w[expert], scales[expert], None if biases is None else biases[expert]
    if module.mode != "affine" or 32 % module.bits:
        return mx.dequantize(w, scales, biases, group_size=module.group_size, bits=module.bits, mode=module.mode,
                             dtype=dtype)
    shifts = mx.arange(0, 32, module.bits, dtype=mx.uint32)
    mask = mx.array((1 << module.bits) - 1, mx.uint32)
    return _unpack_affine(w, scales.astype(dtype), biases.astype(dtype), shifts, mask)


class Linear(nn.Linear):
    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedLinear":
        return QuantizedLinear.from_linear(self, group_size, bits, mode=mode)


# --- CPU decode ------------------------------------------------------------------------
# MLX's CPU quantized matvec runs on one core per call. Decode therefore spreads independent
# work over two extra CPU streams (each has its own thread): the halves of a wide matvec, and
# the halves of a token's routed experts (moe.py).
_cpu_streams: list = []
SPLIT_ROWS = 4096


def cpu_streams() -> list:
    """Two CPU streams for decode work that can run side by side (made on first use).

    Thread-local: an MLX stream made with new_stream works only on the thread that made it, and
    the model must also run on a worker thread (the server, a desktop app's generation thread)."""
    if not _cpu_streams:
        _cpu_streams.extend(mx.new_thread_local_stream(mx.cpu) for _ in range(2))
    return _cpu_streams


def _split_matvec(x: mx.array, m: nn.Module) -> mx.array:
    """A wide quantized matvec in two row halves on two CPU streams."""
    h = m["weight"].shape[0] // 2
    outs = []
    for i, stream in enumerate(cpu_streams()):
        rows = slice(h, None) if i else slice(0, h)
        b = m.get("biases")
        outs.append(mx.quantized_matmul(x, m["weight"][rows], m["scales"][rows], None if b is None else b[rows],
                                        transpose=True, group_size=m.group_size, bits=m.bits, mode=m.mode,
                                        stream=stream))
    return mx.concatenate(outs, axis=-1)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that multiplies densely for prefill on the CPU backend and splits
    wide decode matvecs over two CPU streams."""

    def __call__(self, x: mx.array) -> mx.array:
        if not dense_prefill(x.size // x.shape[-1]):
            if mx.default_device() == mx.cpu and self["weight"].shape[0] >= SPLIT_ROWS and x.size == x.shape[-1]:
                y = _split_matvec(x, self)
                return y + self["bias"] if "bias" in self else y
            return super().__call__(x)
        y = x @ unpack(self, x.dtype).T
        return y + self["bias"] if "bias" in self else y
