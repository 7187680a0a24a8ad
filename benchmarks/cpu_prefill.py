"""CPU prefill products: MLX's own matmul against the numpy route (models/layers.py), in one process.

    python benchmarks/cpu_prefill.py [-n 3]

Float32 products of prefill shapes (layers.matmul) and 4-bit quantized ones (layers.dense_matmul:
unpack, then multiply), each timed with the route off (MLX computes it, with whatever BLAS
_blas.py left it) and on (numpy). Prints a markdown table of medians; the route's overhead (the
eval, the copy back) is inside its times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import edge_ds  # noqa: F401  (before mlx: _blas.py)
from edge_ds import _blas

import mlx.core as mx  # noqa: E402

from edge_ds.models import layers  # noqa: E402

# (rows, in, out): the example, the benchmark model's expert products at -p 128 (all rows of
# one layer's expert, and one expert's share of them), and a dense projection at -p 512.
SHAPES = [(512, 2048, 1408), (128, 1024, 512), (16, 1024, 512), (512, 1024, 2816)]


def median_ms(f: Callable[[], mx.array], trials: int) -> float:
    mx.eval(f())
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def timed(f: Callable[[], mx.array], trials: int) -> tuple[float, float]:
    """(MLX's median ms, the numpy route's median ms) for the same call."""
    saved = _blas.numpy_matmul
    try:
        _blas.numpy_matmul = False
        mlx_ms = median_ms(f, trials)
        _blas.numpy_matmul = True
        return mlx_ms, median_ms(f, trials)
    finally:
        _blas.numpy_matmul = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3, help="timed trials per cell (median)")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    print(f"MLX's BLAS: {_blas.loaded or 'the mlx wheel own'}; numpy route on by default: {_blas.numpy_matmul}\n")
    print("| product | MLX ms | numpy route ms | speed-up | numpy route GFLOP/s |")
    print("|---|---|---|---|---|")
    for rows, inp, out in SHAPES:
        x = mx.random.normal((rows, inp))
        w = mx.random.normal((out, inp)) * 0.05
        q = layers.Linear(inp, out, bias=False)
        q.weight = w
        q = q.to_quantized(64, 4)
        mx.eval(x, w, q.parameters())
        gflop = 2 * rows * inp * out / 1e9
        for kind, f in (("float32", lambda: layers.matmul(x, w.T)), ("4-bit", lambda: layers.dense_matmul(x, q))):
            mlx_ms, numpy_ms = timed(f, args.n)
            print(f"| {kind} [{rows}, {inp}] x [{inp}, {out}] | {mlx_ms:.1f} | {numpy_ms:.1f} | "
                  f"{mlx_ms / numpy_ms:.1f}x | {gflop / numpy_ms * 1e3:.1f} |")


if __name__ == "__main__":
    main()
