"""Point MLX's CPU matmuls at an optimised BLAS when the machine has one (Linux only).

The mlx-cpu wheel for Linux links a reference BLAS. MLX resolves cblas_sgemm at load time, so
loading OpenBLAS into the global symbol scope before mlx is imported redirects it (far faster
float32 matmuls: prefill, and float models; README: Set-up). Without one, `numpy_matmul`
routes the large CPU prefill products through numpy's wheel, which bundles an optimised OpenBLAS
under renamed symbols that MLX cannot bind (models/layers.py: matmul), held to one thread by
`one_numpy_blas_thread` meanwhile. Either way this only changes which BLAS computes the same
products. EDGE_DS_BLAS=off disables both;
EDGE_DS_BLAS=/path/libblas.so picks a library.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None
_OFF = ("off", "0", "none")


def _load() -> str | None:
    choice = os.environ.get("EDGE_DS_BLAS", "")
    if not sys.platform.startswith("linux") or choice.lower() in _OFF:
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
# A loaded OpenBLAS already makes MLX's own matmuls fast and keeps them in MLX's lazy graph; on
# macOS MLX uses Accelerate.
numpy_matmul: bool = (sys.platform.startswith("linux") and loaded is None
                      and os.environ.get("EDGE_DS_BLAS", "").lower() not in _OFF)


# --- numpy's OpenBLAS threads ------------------------------------------------------------
# The OpenBLAS in numpy's wheel stalls for tens of milliseconds in a multi-threaded call whenever
# the machine's cores are busy with other work (Debian's OpenBLAS does not), which made a prefill
# through numpy as slow as MLX's reference BLAS on a shared machine. Its single-threaded calls do
# not stall, so the prefill route holds it to one thread.
_numpy_threads: tuple[Callable[[], int], Callable[[int], None]] | None = None
_numpy_threads_found = False
_hold = threading.Lock()
_holders = 0
_held_from = 0


def numpy_blas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS numpy loaded from its wheel, or None where
    there is none (another numpy build, another OS). numpy must be imported."""
    global _numpy_threads, _numpy_threads_found
    if not _numpy_threads_found:
        _numpy_threads_found = True
        _numpy_threads = _find_numpy_threads()
    return _numpy_threads


def _find_numpy_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "numpy.libs/" in line and "openblas" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        except (OSError, AttributeError):
            continue
        # numpy >= 2 bundles scipy-openblas (scipy_ prefix, 64_ suffix); numpy 1.26, openblas64_.
        for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("scipy_", ""), ("", "")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


@contextmanager
def one_numpy_blas_thread() -> Iterator[bool]:
    """numpy's OpenBLAS on one thread inside (the count is process-wide: nested and concurrent
    holders share one hold, and the last to leave restores it). Yields whether it could."""
    global _holders, _held_from
    threads = numpy_blas_threads()
    if threads is None:
        yield False
        return
    get, put = threads
    with _hold:
        if _holders == 0:
            _held_from = get()
            put(1)
        _holders += 1
    try:
        yield True
    finally:
        with _hold:
            _holders -= 1
            if _holders == 0:
                put(_held_from)
