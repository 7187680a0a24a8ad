"""CPU prefill products through numpy (models/layers.py: matmul, dense_matmul).

Where MLX has no fast BLAS (_blas.py) the large CPU prefill products go through numpy: quantized
weights unpacked by numpy, the product by np.matmul. The route must give MLX's own numbers within
float32 rounding, run when it should (a counting np.matmul shows it), and stay out of decode,
small products, other devices and machines whose MLX already has a fast BLAS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import edge_ds
from edge_ds import _blas
from edge_ds.models import layers
from edge_ds.models.moe import SwitchGLU

ROUNDING = 1e-5  # float32 sums of a few thousand terms, in another order
SYSTEM_BLAS = next((p for p in _blas.CANDIDATES if Path(p).exists()), "")


def rel_err(got: mx.array, ref: mx.array) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """On the CPU with the numpy route on (as without a system BLAS); lists each np.matmul's
    operand shapes."""
    seen: list[tuple] = []
    real = np.matmul

    def counting(a, b, *args, **kwargs):
        seen.append((np.shape(a), np.shape(b)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(np, "matmul", counting)
    monkeypatch.setattr(_blas, "numpy_matmul", True)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield seen
    mx.set_default_device(device)


def both_routes(monkeypatch, calls: list[tuple], f) -> tuple[mx.array, mx.array]:
    """f() through numpy (checked to have used it), then with MLX's own matmul."""
    n = len(calls)
    with_numpy = f()
    mx.eval(with_numpy)
    assert len(calls) > n, "the numpy route did not run"
    n = len(calls)
    monkeypatch.setattr(_blas, "numpy_matmul", False)
    mlx_only = f()
    mx.eval(mlx_only)
    assert len(calls) == n, "the numpy route ran while off"
    monkeypatch.setattr(_blas, "numpy_matmul", True)
    return with_numpy, mlx_only


def quantized_linear(inp: int, out: int, bits: int = 4, group_size: int = 64, bias: bool = False) -> nn.Module:
    lin = layers.Linear(inp, out, bias=bias)
    lin.weight = mx.random.normal((out, inp), key=mx.random.key(1)) * 0.05
    if bias:
        lin.bias = mx.random.normal((out,), key=mx.random.key(2))
    return lin.to_quantized(group_size, bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_numpy_unpacking_equals_mlx_unpacking(bits, group_size):
    w = mx.random.normal((3, 40, 256), key=mx.random.key(0))
    packed, scales, biases = mx.quantize(w, group_size, bits)
    ref = np.asarray(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))
    got = layers._unpack_numpy(np.asarray(packed), np.asarray(scales), np.asarray(biases), bits)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    module = layers.QuantizedExpertLinear(group_size, bits)
    module.weight, module.scales, module.biases = packed, scales, biases
    np.testing.assert_allclose(got[1], np.asarray(layers.unpack(module, mx.float32, expert=1)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_prefill_matches_mlx(monkeypatch, calls, bits, bias):
    lin = quantized_linear(512, 384, bits, bias=bias)
    x = mx.random.normal((1, 64, 512), key=mx.random.key(3))
    got, ref = both_routes(monkeypatch, calls, lambda: lin(x))
    assert {a for a, _ in calls} == {(1, 64, 512)}  # one product, maybe split by output columns
    assert sum(b[-1] for _, b in calls) == 384
    assert rel_err(got, ref) < ROUNDING


def test_float_linear_prefill_matches_mlx(monkeypatch, calls):
    lin = layers.Linear(512, 384, bias=True)
    x = mx.random.normal((1, 64, 512), key=mx.random.key(3))
    got, ref = both_routes(monkeypatch, calls, lambda: lin(x))
    assert rel_err(got, ref) < ROUNDING


@pytest.mark.parametrize("transpose", [True, False])
def test_head_linear_prefill_matches_mlx(monkeypatch, calls, transpose):
    """MLA's per-head stack: x [B, H or 1, L, in] against weight [H, out, in], both directions."""
    head = layers.HeadLinear(128, 64, 4)
    head.weight = mx.random.normal((4, 64, 128), key=mx.random.key(4)) * 0.05
    qhead = head.to_quantized(64, 4)
    x = mx.random.normal((1, 1, 96, 128 if transpose else 64), key=mx.random.key(5))  # shared by the heads
    for module in (head, qhead):
        got, ref = both_routes(monkeypatch, calls, lambda: module(x, transpose=transpose))
        assert got.shape == (1, 4, 96, 64 if transpose else 128)
        assert rel_err(got, ref) < ROUNDING


@pytest.mark.parametrize("quantized", [True, False])
def test_per_expert_prefill_matches_mlx(monkeypatch, calls, quantized):
    """SwitchGLU's CPU prefill (one product per expert on its sorted rows) against MLX's."""
    glu = SwitchGLU(256, 192, 8)
    for i, proj in enumerate((glu.gate_proj, glu.up_proj, glu.down_proj)):
        proj.weight = mx.random.normal(proj.weight.shape, key=mx.random.key(10 + i)) * 0.05
    if quantized:
        nn.quantize(glu, 64, 4)
    x = mx.random.normal((96, 256), key=mx.random.key(6))
    indices = mx.random.randint(0, 8, (96, 4), key=mx.random.key(7))
    got, ref = both_routes(monkeypatch, calls, lambda: glu(x, indices))
    assert got.shape == (96, 4, 256)
    assert len(calls) >= 3 * 8 - 3  # every expert's three products (bar one too small, at most)
    assert rel_err(got, ref) < ROUNDING


def test_route_stays_out_of_decode_small_products_and_other_devices(monkeypatch, calls):
    lin = quantized_linear(512, 384)
    mx.eval(lin(mx.random.normal((1, 1, 512))))  # decode: the quantized kernel
    assert not calls
    mx.eval(lin(mx.random.normal((1, layers.PREFILL_ROWS, 512))))
    assert len(calls) == 1
    small = layers.Linear(64, 64)
    mx.eval(small(mx.random.normal((1, 16, 64))))  # under NUMPY_MIN_MACS: MLX's own
    assert len(calls) == 1
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert not layers.numpy_route()  # Metal and CUDA keep their own matmuls


@pytest.mark.parametrize("choice", ["off", "/nonexistent/libblas.so", "system"])
def test_route_is_on_only_without_a_fast_blas(choice):
    """_blas decides at import: on (Linux) when no BLAS was preloaded, off when one was or when
    EDGE_DS_BLAS=off."""
    if choice == "system":
        if not SYSTEM_BLAS:
            pytest.skip("no system OpenBLAS here")
        choice = SYSTEM_BLAS
    code = "import edge_ds._blas as b; print(b.loaded is not None, b.numpy_matmul)"
    env = {**os.environ, "EDGE_DS_BLAS": choice}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    linux = sys.platform.startswith("linux")
    assert out.split() == [str(linux and choice == SYSTEM_BLAS), str(linux and choice.startswith("/nonexistent"))]


def test_numpy_blas_is_held_to_one_thread_and_restored():
    """numpy's own OpenBLAS stalls in multi-threaded calls on a busy machine (_blas.py): the route
    holds it to one thread, nested holds included, and gives the count back."""
    threads = _blas.numpy_blas_threads()
    if threads is None:
        pytest.skip("numpy here has no OpenBLAS of its own")
    get = threads[0]
    before = get()
    with _blas.one_numpy_blas_thread() as held:
        assert held and get() == 1
        with _blas.one_numpy_blas_thread():
            assert get() == 1
        assert get() == 1
    assert get() == before


def test_default_model_logits_equal_without_the_route(monkeypatch, calls):
    lm = edge_ds.load(backend="mlx")  # the route is MLX's (off Apple Silicon the default is onnx)
    tokens = np.random.default_rng(0).integers(0, lm.config.vocab_size, (1, 64))
    with_numpy = lm.logits(tokens)
    assert calls
    monkeypatch.setattr(_blas, "numpy_matmul", False)
    without = lm.logits(tokens)
    assert rel_err(with_numpy, without) < 1e-5
