"""Reading a tensor-parallel rank's slices of a checkpoint: offset reads of only its bytes.

A slice along axis a of a row-major tensor [*outer, n, *inner] is, for each index of the outer
dimensions, one contiguous byte range of (hi - lo) * prod(inner) elements: one pread for a row
split of a 2-D weight (outer = 1), one per expert for stacked experts' rows, one per row for a
column split. A packed quantized weight [out, in * bits / 32] and its scales/biases
[out, in / group_size] split by columns the same way, as long as each rank's columns are whole
groups (plan.tensor_plan refuses the rest from config.json, and TensorPlan.split checks each
header before anything is read).

Note on the disk: a column split reads one short range per row, so where a row's share is
smaller than a page (4-16 KiB) the OS still brings whole pages in: the rank is handed (and
/proc/self/io counts) only its bytes, but the disk serves more of those tensors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, numpy_dtype, pread_into, require_finite
from ..config import ModelConfig
from ..errors import EdgeDSError
from ..experts.store import open_for_slices
from ..layout import WEIGHTS_GLOB, is_fp8_scale, is_mtp, is_recomputed, is_routed_expert
from .plan import TensorPlan


class SliceReader:
    """load_model's `shard`: this rank's slice of every tensor of the main model, by offset reads.

    counts: bytes read so far, split into "split" (this rank's share of split tensors: attention
    heads, intermediate dimensions), of which "experts" (routed experts), and "trunk" (tensors every
    rank reads whole). totals: the same tensors' full sizes on disk ("split", "trunk", "experts")."""

    def __init__(self, plan: TensorPlan):
        self.plan = plan
        self.counts = {"split": 0, "experts": 0, "trunk": 0}
        self.totals = {"split": 0, "experts": 0, "trunk": 0}
        self._fds: dict[Path, int] = {}

    def config(self, cfg: ModelConfig) -> ModelConfig:
        return self.plan.local_config(cfg)

    def read(self, directory: Path, cfg: ModelConfig) -> dict[str, mx.array]:
        """name -> this rank's slice (dtype as on disk); every header is checked before any read."""
        with Checkpoint(directory, WEIGHTS_GLOB) as ckpt:
            infos = [ckpt.info(n) for n in ckpt.names() if not is_mtp(n, cfg) and not is_recomputed(n)]
        if any(is_fp8_scale(i.name) for i in infos):
            raise EdgeDSError(f"{directory}: an FP8 checkpoint; convert it to MLX weights first (edge-ds convert)")
        jobs = [(info, self.plan.split(info.name, info.shape)) for info in infos]  # raises before reading
        for info, cut in jobs:
            kind = "trunk" if cut is None else "split"
            self.totals[kind] += info.nbytes
            if cut is not None and is_routed_expert(info.name):
                self.totals["experts"] += info.nbytes
        out = {}
        try:
            for info, cut in jobs:
                a = self._read(info, *(cut or (0, 0, info.shape[0] if info.shape else 1)))
                if cut is None:
                    self.counts["trunk"] += a.nbytes
                else:
                    self.counts["split"] += a.nbytes
                    if is_routed_expert(info.name):
                        self.counts["experts"] += a.nbytes
                require_finite(a, info.path, f"tensor {info.name!r}")
                out[info.name] = _to_mx(a)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        return out

    def _read(self, info: TensorInfo, axis: int, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) along `axis` of the tensor: one pread per index of the axes before it."""
        dtype = numpy_dtype(info.dtype)
        shape = info.shape or (1,)
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1:]) * dtype.itemsize  # bytes per step along the axis
        stride, piece = shape[axis] * inner, (hi - lo) * inner
        buf = np.empty(outer * piece, np.uint8)
        view, fd = memoryview(buf), self._fd(info.path)
        # A column split is one short read per row (DeepSeek-V3: ~3e8 of them), so the loop calls
        # preadv itself (half the time of pread_into's loop); a short read is finished by pread_into.
        preadv = getattr(os, "preadv", None) if piece < 1 << 30 else None
        for i in range(outer):
            start = info.offset + i * stride + lo * inner
            chunk = view[i * piece:(i + 1) * piece]
            got = preadv(fd, [chunk], start) if preadv is not None else 0
            if got != piece and got + pread_into(fd, chunk[got:], start + got) != piece:
                raise EdgeDSError(f"{info.path}: truncated: tensor {info.name!r} needs bytes {start}..{start + piece}")
        return buf.view(dtype).reshape(*shape[:axis], hi - lo, *shape[axis + 1:]) if info.shape else \
            buf.view(dtype).reshape(())

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_for_slices(path)
        return fd


def _to_mx(a: np.ndarray) -> mx.array:
    if a.dtype == np.dtype(ml_dtypes.bfloat16):  # MLX takes bfloat16 through its bits
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)
