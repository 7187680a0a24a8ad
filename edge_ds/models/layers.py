"""Linear layers the DeepSeek modules need beyond mlx.nn: per-head and per-expert stacks.

Each has a float form and a quantized form with mlx-lm's parameter names (weight, scales,
biases), so checkpoints in the mlx-lm layout load unchanged.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import _blas


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
        w = self.weight.swapaxes(-1, -2) if transpose else self.weight
        return matmul(x, w) if dense_prefill(x.shape[-2]) else x @ w

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> "QuantizedHeadLinear":
        return QuantizedHeadLinear(group_size, bits, mode).set_weight(self.weight)


class QuantizedHeadLinear(_Quantized):
    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        if dense_prefill(x.shape[-2]):
            return dense_matmul(x, self, transpose=transpose)
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

    def expert_matmul(self, x: mx.array, e: int) -> mx.array:
        """x [n, in] times expert e's weight -> [n, out] (CPU prefill: moe.py)."""
        return matmul(x, self["weight"][e].astype(x.dtype).T)

    def each_expert(self, x: mx.array) -> mx.array:
        """Every expert on its own rows: x [E, n, in] -> [E, n, out] (DeepSeek-V4's grouped output
        projection: its head groups are the "experts")."""
        return matmul(x, self["weight"].astype(x.dtype).swapaxes(-1, -2))

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> "QuantizedExpertLinear":
        return QuantizedExpertLinear(group_size, bits, mode).set_weight(self.weight)


class QuantizedExpertLinear(_Quantized):
    def expert_matmul(self, x: mx.array, e: int) -> mx.array:
        """x [n, in] times expert e's weight unpacked to float -> [n, out] (CPU prefill: moe.py)."""
        return dense_matmul(x, self, expert=e)

    def each_expert(self, x: mx.array) -> mx.array:
        """Every expert on its own rows: x [E, n, in] -> [E, n, out]."""
        if dense_prefill(x.shape[1]):
            return dense_matmul(x, self)
        return self(x[:, :, None], mx.arange(x.shape[0])[:, None]).squeeze(-2)

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


def dense_matmul(x: mx.array, module: nn.Module, expert: int | None = None, transpose: bool = True) -> mx.array:
    """x @ W.T (x @ W unless `transpose`), W a quantized module's weights unpacked to float
    (`expert` picks one expert of a stacked module): the CPU prefill product."""
    if (numpy_route() and x.dtype == mx.float32 and module.mode == "affine" and 32 % module.bits == 0
            and _macs(x.shape, _float_shape(module, expert, transpose)) >= NUMPY_MIN_MACS):
        return _numpy_dense(x, module, expert, transpose)
    w = unpack(module, x.dtype, expert)
    return matmul(x, w.swapaxes(-1, -2) if transpose else w)


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


# --- CPU prefill through numpy -----------------------------------------------------------
# Without a system OpenBLAS (_blas.py) MLX's CPU float32 matmuls run on the mlx-cpu wheel's
# reference BLAS, while numpy's wheel bundles an optimised OpenBLAS. So on the CPU the large
# prefill products go through np.matmul: the inputs are evaluated and viewed in place by numpy
# (MLX arrays export their buffer and strides, so nothing is copied in), and the product is copied
# back into an mx.array. Quantized weights are unpacked by numpy too, straight into the array the
# product reads: several times faster than MLX's CPU unpacking kernel, and no copy into MLX.
# Each such product ends MLX's lazy graph (an eval), which costs little next to the product
# itself above NUMPY_MIN_MACS multiply-adds; smaller ones stay in MLX. numpy's OpenBLAS is held
# to one thread meanwhile (_blas.py: why).
NUMPY_MIN_MACS = 1 << 18


def numpy_route() -> bool:
    """Whether large float32 products go through numpy here: on the CPU when MLX has no fast BLAS."""
    return _blas.numpy_matmul and mx.default_device() == mx.cpu


def _macs(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Multiply-adds of a @ b for these shapes (both at least 2-D)."""
    return math.prod(np.broadcast_shapes(a[:-2], b[:-2])) * a[-2] * a[-1] * b[-1]


def matmul(a: mx.array, b: mx.array) -> mx.array:
    """a @ b, through numpy for a large float32 product when numpy_route(); MLX's own otherwise."""
    if (numpy_route() and a.dtype == b.dtype == mx.float32 and min(a.ndim, b.ndim) >= 2
            and _macs(a.shape, b.shape) >= NUMPY_MIN_MACS):
        mx.eval(a, b)
        with _blas.one_numpy_blas_thread():
            y = np.matmul(np.asarray(a), np.asarray(b))
        return mx.array(y)
    return a @ b


def _float_shape(module: nn.Module, expert: int | None, transpose: bool) -> tuple[int, ...]:
    """The shape of the float operand dense_matmul multiplies by (W.T or W)."""
    *lead, out, words = module["weight"].shape
    lead = lead[1:] if expert is not None else lead
    inp = words * 32 // module.bits
    return (*lead, inp, out) if transpose else (*lead, out, inp)


def _numpy_dense(x: mx.array, module: nn.Module, expert: int | None, transpose: bool) -> mx.array:
    w, scales, biases = module["weight"], module["scales"], module["biases"]
    if expert is not None:
        w, scales, biases = w[expert], scales[expert], biases[expert]
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    mx.eval(x, w, scales, biases)
    f = _unpack_numpy(np.asarray(w), np.asarray(scales), np.asarray(biases), module.bits)
    with _blas.one_numpy_blas_thread():
        y = np.matmul(np.asarray(x), f.swapaxes(-1, -2) if transpose else f)
    return mx.array(y)


def _unpack_numpy(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """_unpack_affine's float32 values, computed by numpy: w [..., out, in * bits / 32] (uint32),
    scales and biases [..., out, groups] (float32) -> [..., out, in]."""
    q = _spread(np.ascontiguousarray(w).view(np.uint8), bits)  # [..., out, in], one value a byte
    f = q.reshape(*scales.shape, -1).astype(np.float32)  # [..., out, groups, group_size]
    f *= scales[..., None]
    f += biases[..., None]
    return f.reshape(q.shape)


def _spread(packed: np.ndarray, bits: int) -> np.ndarray:
    """Bytes holding 8 // bits values each (lowest bits first) -> one value a byte, in order.

    Little-endian (as MLX's hosts): a word's first values are in its first byte. Each byte is
    widened to a word of 8 // bits bytes, and its values are moved to their bytes by halves (for
    4 bits: v | v << 4, masked to 0x0F0F): whole-array integer ops rather than strided writes."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    v = packed.astype(f"<u{per_byte}")
    span = per_byte
    while span > 1:
        half = span // 2
        field = (1 << (half * bits)) - 1  # the values of one half-field, one every half * 8 bits
        mask = sum(field << (8 * half * j) for j in range(per_byte // half))
        v = (v | (v << (half * (8 - bits)))) & np.array(mask, v.dtype)
        span = half
    return v.view(np.uint8).reshape(*packed.shape[:-1], -1)


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if not (numpy_route() and dense_prefill(x.size // x.shape[-1])):
            return super().__call__(x)
        y = matmul(x, self["weight"].T)
        return y + self["bias"] if "bias" in self else y

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
        y = dense_matmul(x, self)
        return y + self["bias"] if "bias" in self else y
