"""Routed experts on disk: where each expert's slices are, and parallel preads into cache slots.

The mlx-lm layout stacks a layer's experts: `model.layers.{l}.mlp.switch_mlp.{proj}.{kind}` is
[E, ...] row-major, so expert e's slice is the contiguous byte range offset + e * nbytes / E.
Unconverted Hugging Face dirs keep one tensor per expert (`mlp.experts.{e}.{proj}.{kind}`);
both are read the same way, by byte offset, without touching the rest of the file.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np

from ..checkpoint import Checkpoint, numpy_dtype, pread_into, require_finite
from ..config import ModelConfig
from ..errors import EdgeDSError
from ..layout import EXPERT_PROJS, QUANT_PARTS, expert_name, stacked_name

_NP_OF_MX = {mx.float32: np.dtype(np.float32), mx.float16: np.dtype(np.float16),
             mx.bfloat16: np.dtype(ml_dtypes.bfloat16)}
_MX_OF_NP = {np.dtype(np.uint32): mx.uint32, np.dtype(np.uint8): mx.uint8, np.dtype(np.float32): mx.float32,
             np.dtype(np.float16): mx.float16, np.dtype(ml_dtypes.bfloat16): mx.bfloat16}


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor kind (e.g. "gate_proj.scales") of every expert of one layer."""

    key: str  # "{proj}.{part}", e.g. "gate_proj.scales"
    shape: tuple[int, ...]  # one expert's shape
    disk_dtype: np.dtype
    dtype: np.dtype  # in memory: floating tensors become the compute dtype, as in the resident model
    nbytes: int  # one expert's bytes on disk
    names: tuple[str, ...]  # checkpoint tensor name per expert (the same name for every expert when stacked)
    paths: tuple[Path, ...]  # file per expert
    offsets: tuple[int, ...]  # absolute byte offset of expert e's slice


class ExpertStore:
    """Locates and reads routed-expert slices of a model dir with a pool of positional reads.

    Opens its own file descriptors so it can tell the OS how they are read: random access
    (no read-ahead of neighbouring experts) and, where asked for, no page cache (macOS F_NOCACHE;
    Linux drops each slice's pages once read), so expert bytes live only in the budgeted cache.
    """

    def __init__(self, directory: str | Path, cfg: ModelConfig, dtype: mx.Dtype, threads: int = 4,
                 page_cache: bool = True):
        self.directory = Path(directory)
        self.cfg = cfg
        self.layers = cfg.moe_layers
        self.num_experts = cfg.n_routed_experts
        self.dtype = _NP_OF_MX[dtype]
        ckpt = Checkpoint(self.directory)
        ckpt.close()  # only its validated headers are needed; reads go through our own descriptors
        self.tensors: dict[int, dict[str, ExpertTensor]] = {l: self._locate(ckpt, l) for l in self.layers}
        first = self.tensors[self.layers[0]] if self.layers else {}
        for l in self.layers:
            got = {k: (t.shape, t.dtype) for k, t in self.tensors[l].items()}
            if got != {k: (t.shape, t.dtype) for k, t in first.items()}:
                raise EdgeDSError(f"{self.directory}: layer {l}'s routed experts differ in shape or dtype from "
                                  f"layer {self.layers[0]}'s (lazy expert loading needs one expert shape)")
        self.keys = list(first)
        self.expert_bytes = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in first.values())  # in memory
        self.disk_bytes = sum(t.nbytes for t in first.values())  # on disk
        self.page_cache = page_cache
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edge-ds-experts")

    @property
    def routed_bytes(self) -> int:
        """Bytes of all routed experts as they would sit in memory."""
        return self.expert_bytes * self.num_experts * len(self.layers)

    # --- where things are -----------------------------------------------------------
    def _locate(self, ckpt: Checkpoint, layer: int) -> dict[str, ExpertTensor]:
        E, D, I = self.num_experts, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        out = {}
        for proj in EXPERT_PROJS:
            out_dim, in_dim = (D, I) if proj == "down_proj" else (I, D)
            for kind in QUANT_PARTS:
                stacked = stacked_name(layer, proj, kind)
                per_expert = [expert_name(layer, e, proj, kind) for e in range(E)]
                if stacked in ckpt:
                    info = ckpt.info(stacked)
                    if not info.shape or info.shape[0] != E or info.nbytes % E:
                        raise EdgeDSError(f"{info.path}: tensor {stacked!r} has shape {list(info.shape)}, "
                                          f"expected [{E}, ...] (n_routed_experts = {E})")
                    step = info.nbytes // E
                    shape, code = info.shape[1:], info.dtype
                    names, paths = (stacked,) * E, (info.path,) * E
                    offsets = tuple(info.offset + e * step for e in range(E))
                elif per_expert[0] in ckpt:
                    infos = [ckpt.info(n) for n in per_expert]  # raises naming the missing tensor
                    shape, code = infos[0].shape, infos[0].dtype
                    for i in infos:
                        if i.shape != shape or i.dtype != code:
                            raise EdgeDSError(f"{i.path}: tensor {i.name!r} is {i.dtype} {list(i.shape)}, expected "
                                              f"{code} {list(shape)} like expert 0")
                    names, paths = tuple(per_expert), tuple(i.path for i in infos)
                    offsets = tuple(i.offset for i in infos)
                elif kind == "weight":
                    raise EdgeDSError(f"{self.directory}: no routed-expert weights for layer {layer} "
                                      f"(expected {stacked!r})")
                else:
                    continue
                disk = numpy_dtype(code)
                dtype = self.dtype if np.issubdtype(disk, np.floating) or disk == np.dtype(ml_dtypes.bfloat16) \
                    else disk
                if len(shape) != 2 or shape[0] != out_dim:
                    raise EdgeDSError(f"{paths[0]}: tensor {names[0]!r}: one expert is {list(shape)}, expected "
                                      f"[{out_dim}, ...] (hidden_size {D}, moe_intermediate_size {I})")
                if kind == "weight" and np.issubdtype(dtype, np.floating) and shape[1] != in_dim:
                    raise EdgeDSError(f"{paths[0]}: tensor {names[0]!r}: one expert is {list(shape)}, expected "
                                      f"[{out_dim}, {in_dim}]")
                out[f"{proj}.{kind}"] = ExpertTensor(f"{proj}.{kind}", tuple(shape), disk, dtype,
                                                     int(np.prod(shape)) * disk.itemsize, names, paths, offsets)
        return out

    def mx_dtype(self, key: str) -> mx.Dtype:
        return _MX_OF_NP[self.tensors[self.layers[0]][key].dtype]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[self.layers[0]][key].shape

    def files(self) -> list[Path]:
        return sorted({p for ts in self.tensors.values() for t in ts.values() for p in t.paths})

    # --- reading ----------------------------------------------------------------------
    def submit(self, layer: int, expert: int, dests: dict[str, np.ndarray]) -> list[Future]:
        """Starts reading expert `expert` of `layer` into `dests` (key -> writable array of one
        expert's shape and in-memory dtype); one read per tensor, all in flight at once."""
        return [self._pool.submit(self._read, self.tensors[layer][key], layer, expert, dest)
                for key, dest in dests.items()]

    def read(self, requests: list[tuple[int, int, dict[str, np.ndarray]]]) -> None:
        """Reads several experts and waits; the first failure is raised.

        Slices already in the page cache are copied on this thread (Linux RWF_NOWAIT: a handoff
        to the pool costs more than the copy); the rest go to the pool, several in flight, since
        cold reads wait on the disk (README: Lazy expert loading).
        """
        cold = []
        for layer, expert, dests in requests:
            for key, dest in dests.items():
                t = self.tensors[layer][key]
                if not (_NOWAIT and self.page_cache) or self._read(t, layer, expert, dest, _NOWAIT) is None:
                    cold.append((t, layer, expert, dest))
        wait([self._pool.submit(self._read, *c) for c in cold])

    def _read(self, t: ExpertTensor, layer: int, expert: int, dest: np.ndarray, flags: int = 0) -> int | None:
        """Fills `dest` with expert `expert`'s slice of `t`; with RWF_NOWAIT in flags, returns None
        (and reads nothing useful) unless the whole slice is in the page cache."""
        path, offset, name = t.paths[expert], t.offsets[expert], t.names[expert]
        direct = dest.dtype == t.disk_dtype and dest.flags.c_contiguous
        buf = dest.reshape(-1).view(np.uint8) if direct else np.empty(t.nbytes, np.uint8)
        if flags:
            try:
                if os.preadv(self._fd(path), [memoryview(buf)], offset, flags) != t.nbytes:
                    return None
            except (BlockingIOError, OSError):
                return None
            got = t.nbytes
        else:
            got = pread_into(self._fd(path), memoryview(buf), offset)
        if not self.page_cache:
            forget_pages(self._fd(path), offset, t.nbytes)
        if got != t.nbytes:
            raise EdgeDSError(f"{path}: truncated: expert {expert} of {name!r} needs bytes {offset}..{offset + t.nbytes} "
                              f"but only {got} could be read (file changed or truncated since it was opened)")
        if not direct:
            np.copyto(dest, buf.view(t.disk_dtype).reshape(t.shape), casting="unsafe")
        require_finite(dest, path, f"corrupt data: expert {expert} of {name!r} (layer {layer}) at byte offset {offset}")
        return got

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = open_for_slices(path)
                    if not self.page_cache:
                        bypass_page_cache(fd)
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def wait(futures: list[Future]) -> int:
    """Waits for every read (so none still writes into a slot) and raises the first failure."""
    error, total = None, 0
    for f in futures:
        try:
            total += f.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others finish
            error = error or e
    if error is not None:
        raise error
    return total


_NOWAIT = getattr(os, "RWF_NOWAIT", 0) if hasattr(os, "preadv") else 0  # Linux: fail instead of waiting on disk


# --- platform hints (all optional: a missing call changes speed, never results) ------------
def advise_random(fd: int) -> None:
    """Linux: no read-ahead, an expert slice is read exactly."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass


def open_for_slices(path: Path) -> int:
    """A read-only descriptor for offset reads of slices of `path` (no read-ahead past them)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise EdgeDSError(f"{path}: cannot open: {e.strerror or e}") from None
    advise_random(fd)
    return fd


def bypass_page_cache(fd: int) -> None:
    """macOS: F_NOCACHE, so the page cache does not hold a second copy of cached experts."""
    if sys.platform == "darwin":
        try:
            import fcntl

            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
        except (ImportError, OSError):
            pass


def forget_pages(fd: int, offset: int, nbytes: int) -> None:
    """Linux: drop a slice just read from the page cache (macOS does not cache it: F_NOCACHE)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def drop_page_cache(paths: list[Path]) -> bool:
    """Asks the OS to drop `paths` from the page cache (for cold-start measurements).
    Linux: posix_fadvise(DONTNEED); elsewhere nothing happens and False is returned."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True
