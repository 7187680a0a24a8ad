"""Point MLX's CPU matmuls at an optimised BLAS when the machine has one (Linux only).

The mlx-cpu wheel for Linux links a reference BLAS. MLX resolves cblas_sgemm at load time, so
loading OpenBLAS into the global symbol scope before mlx is imported redirects it (far faster
float32 matmuls: prefill, and float models; README: Set-up). This only
changes which BLAS computes the same products. EDGE_DS_BLAS=off disables it;
EDGE_DS_BLAS=/path/libblas.so picks a library.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def _load() -> str | None:
    choice = os.environ.get("EDGE_DS_BLAS", "")
    if not sys.platform.startswith("linux") or choice.lower() in ("off", "0", "none"):
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: mlx already bound its BLAS
    for path in ([choice] if choice else CANDIDATES):
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


loaded = _load()
