"""Read tensors from safetensors checkpoints without loading whole files.

A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON
(name -> {dtype, shape, data_offsets}, plus an optional "__metadata__" string map),
then the raw little-endian tensor bytes. Offsets in the JSON are relative to the
end of the header; `TensorInfo.offset` is absolute.

The header is validated completely at open time, so a truncated or corrupt file is
reported before any weights are read. Reads use positional I/O (os.preadv/pread) on
a cached file descriptor, so many threads may read the same file at once.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import brief
from .errors import EdgeDSError
from .layout import INDEX_FILE

# A real header is a few MB at most (DeepSeek-V3 shards: ~100 KB). Anything bigger is
# corruption or a non-safetensors file, and must not make us allocate gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Largest single read syscall: Linux caps one read at ~2 GiB, macOS at INT_MAX.
_MAX_READ = 1 << 30
# numpy 1.x arrays have at most 32 dimensions (numpy 2: 64); real tensors have a handful.
MAX_DIMS = 32


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fills `view` from byte `offset` of the open file `fd` without moving its position (safe
    from many threads); returns the bytes read, short only at end of file."""
    done, n = 0, len(view)
    while done < n:
        chunk = view[done : done + min(n - done, _MAX_READ)]
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [chunk], offset + done)  # reads straight into the array
        else:
            data = os.pread(fd, len(chunk), offset + done)
            got = len(data)
            chunk[:got] = data
        if got == 0:
            break
        done += got
    return done


def require_finite(a: np.ndarray, where: str | Path, what: str) -> None:
    """Raises naming `where` (a file) and `what` (a tensor, a slice of one) when `a` holds NaN or Inf."""
    if np.issubdtype(a.dtype, np.floating) or a.dtype == np.dtype(ml_dtypes.bfloat16):
        finite = np.isfinite(a.astype(np.float32, copy=False))
        if not finite.all():
            raise EdgeDSError(f"{where}: {what} has {int((~finite).sum())} NaN/Inf values")


_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype for a safetensors dtype code ("BF16", "F8_E4M3", "F32", ...)."""
    try:
        return _DTYPES[code]
    except (KeyError, TypeError):
        raise EdgeDSError(f"unknown safetensors dtype {code!r}") from None


class TensorNotFoundError(EdgeDSError, KeyError):
    """A tensor name that the checkpoint does not hold (also catchable as KeyError)."""

    __str__ = Exception.__str__  # KeyError would wrap the message in quotes


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path  # the file holding it
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _is_int(x: object) -> bool:
    # JSON true/false load as bool, which is an int subclass; they are not offsets.
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, say: no such file either
        return False


class SafetensorsFile:
    """One safetensors file: its validated header, and reads of single tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._fd: int | None = None
        self._file = None  # only used where os.pread does not exist (Windows)
        self._lock = threading.Lock()
        self._parse_header()

    def _fail(self, what: str) -> EdgeDSError:
        return EdgeDSError(f"{self.path}: {what}")

    def _parse_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise self._fail(f"not a safetensors file: only {size} bytes, need at least 8")
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > MAX_HEADER_BYTES:
                    raise self._fail(f"corrupt safetensors header: header length {header_len} is implausible")
                if 8 + header_len > size:
                    raise self._fail(
                        f"truncated safetensors file: header length {header_len} exceeds file size {size}"
                    )
                raw = f.read(header_len)
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # also bad UTF-8, too-long integers, too-deep nesting
            raise self._fail(f"safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("safetensors header is not a JSON object")

        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise self._fail("safetensors __metadata__ must map strings to strings")
        self.metadata = meta

        data_start = 8 + header_len
        data_len = size - data_start
        ranges: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, data_start, data_len)
            info = self.tensors[name]
            if info.nbytes:
                ranges.append((info.offset, info.offset + info.nbytes, name))

        ranges.sort()
        for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
            if begin < prev_end:
                raise self._fail(f"tensors {prev!r} and {name!r} have overlapping data_offsets")

    def _parse_entry(self, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._fail(f"tensor {name!r}: header entry needs dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _DTYPES:
            raise self._fail(f"tensor {name!r}: unknown dtype {brief(code)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape[:MAX_DIMS + 1]):
            raise self._fail(f"tensor {name!r}: shape {brief(shape)} is not a list of non-negative integers")
        itemsize = _DTYPES[code].itemsize
        # numpy refuses more dimensions, or sizes past 2**63 bytes even with a zero dimension elsewhere.
        if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) * itemsize >= 2**63:
            raise self._fail(f"tensor {name!r}: shape {brief(shape)} is too large for an array")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"tensor {name!r}: data_offsets {brief(offsets)} is not [begin, end] "
                             "with 0 <= begin <= end")
        begin, end = offsets
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise self._fail(
                f"tensor {name!r}: data_offsets span {end - begin} bytes but {code} {shape} needs {expected}"
            )
        if end > data_len:
            raise self._fail(
                f"truncated safetensors file: tensor {name!r} ends at data byte {end} "
                f"but the file has only {data_len} data bytes"
            )
        return TensorInfo(name, code, tuple(shape), self.path, data_start + begin, expected)

    def read(self, name: str) -> np.ndarray:
        """Read one tensor (only its bytes) into a new writable array."""
        info = self.tensors.get(name)
        if info is None:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}")
        buf = np.empty(info.nbytes, dtype=np.uint8)
        if info.nbytes:
            got = self._read_into(memoryview(buf), info.offset)
            if got != info.nbytes:
                raise self._fail(
                    f"tensor {name!r}: read {got} of {info.nbytes} bytes (file changed or truncated since it was opened)"
                )
        return buf.view(_DTYPES[info.dtype]).reshape(info.shape)

    def _read_into(self, view: memoryview, offset: int) -> int:
        """Fill `view` from the file at `offset`; returns bytes read (short only at EOF)."""
        fd = self._fileno()
        if not hasattr(os, "pread"):
            # No positional reads: serialise seek+read on the shared file object.
            with self._lock:
                self._file.seek(offset)
                return self._file.readinto(view) or 0
        return pread_into(fd, view, offset)

    def _fileno(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    try:
                        if hasattr(os, "pread"):
                            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                        else:
                            self._file = open(self.path, "rb", buffering=0)
                            self._fd = self._file.fileno()
                    except OSError as e:
                        raise self._fail(f"cannot open: {e.strerror or e}") from None
        return self._fd

    def close(self) -> None:
        """Close the cached file descriptor (a later read reopens it)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            elif self._fd is not None:
                os.close(self._fd)
            self._fd = self._file = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


class Checkpoint:
    """All safetensors of one model directory, looked up by tensor name.

    With model.safetensors.index.json, its weight_map is authoritative: exactly the
    tensors it lists are visible (stray tensors or files it does not name are ignored).
    Without one, every file matching `pattern` in the directory is used.
    """

    def __init__(self, directory: str | Path, pattern: str = "*.safetensors"):
        self.directory = Path(directory)
        self.pattern = pattern
        if not self.directory.is_dir():
            raise EdgeDSError(f"{self.directory}: not a directory")
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        index = self.directory / INDEX_FILE
        if index.exists():
            self._load_index(index)
        else:
            self._load_all()

    def _load_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, RecursionError, AttributeError) as e:
            raise EdgeDSError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise EdgeDSError(f"{index}: weight_map must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            # A shard is a file of this directory: never a path that reads files elsewhere.
            if shard in ("", ".", "..") or Path(shard).name != shard:
                raise EdgeDSError(f"{index}: shard {brief(shard)} is not a file name in {self.directory}")
            path = self.directory / shard
            if not _is_file(path):
                raise EdgeDSError(f"{index}: shard {shard} is missing from {self.directory}")
            self._files[path] = SafetensorsFile(path)
        for name, shard in weight_map.items():
            f = self._files[self.directory / shard]
            if name not in f.tensors:
                raise EdgeDSError(f"{f.path}: tensor {name!r} is not in this shard, but {index.name} says it is")
            self._where[name] = f

    def _load_all(self) -> None:
        paths = sorted(p for p in self.directory.glob(self.pattern) if p.is_file())
        if not paths:
            raise EdgeDSError(f"{self.directory}: no {self.pattern} files")
        for path in paths:
            f = self._files[path] = SafetensorsFile(path)
            for name in f.tensors:
                other = self._where.get(name)
                if other is not None:
                    raise EdgeDSError(f"{path}: tensor {name!r} is also in {other.path.name}")
                self._where[name] = f

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def info(self, name: str) -> TensorInfo:
        """Where tensor `name` is stored."""
        f = self._where.get(name)
        if f is None:
            raise TensorNotFoundError(f"{self.directory}: no tensor named {name!r}")
        return f.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """Read tensor `name` into a new writable array."""
        self.info(name)  # the checkpoint-level error if missing
        return self._where[name].read(name)

    def files(self) -> list[Path]:
        """The safetensors files in use, sorted."""
        return sorted(self._files)

    def total_bytes(self) -> int:
        """Bytes of tensor data (headers excluded) over all visible tensors."""
        return sum(f.tensors[name].nbytes for name, f in self._where.items())

    def close(self) -> None:
        """Close every cached file descriptor."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, {len(self._where)} tensors in {len(self._files)} files)"
