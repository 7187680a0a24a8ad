"""What the converters share: writing their output so that DST appears complete or not at all,
the progress callback, the error for a tensor the checkpoint lacks."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge_ds import layout
from edge_ds.checkpoint import Checkpoint
from edge_ds.errors import EdgeDSError

from .fp8 import read_float32

# A converter's progress callback: (units done, units in all, what it is working on).
Progress = Callable[[int, int, str], None]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "LICENSE", "LICENSE.txt", "README.md")


def check_paths(src: Path, dst: Path) -> None:
    """SRC must be a directory and DST must not exist yet (a converter never overwrites)."""
    if not src.is_dir():
        raise EdgeDSError(f"{src}: not a directory")
    if dst.exists():
        raise EdgeDSError(f"{dst}: already exists; choose a new output directory")


def missing_tensor(ckpt: Checkpoint | Source, name: str) -> EdgeDSError:
    """The error for tensor `name`, which config.json implies and `ckpt` lacks (an expert's says which)."""
    expert = layout.parse_expert(name)
    which = "" if expert is None else f"expert {expert[1]} of layer {expert[0]}: "
    label = ckpt.missing_label(name) if isinstance(ckpt, Source) else f"tensor '{name}'"
    return EdgeDSError(f"{ckpt.directory}: {which}{label} is missing from the checkpoint")


class Source:
    """A checkpoint seen under the runtime's tensor names (layout.hf_shapes): what the MLX converter
    reads. This one is a Hugging Face checkpoint as stored (BF16/F32, or FP8 beside a
    `weight_scale_inv`); official_v4.V4Source renames and unpacks DeepSeek-V4's layouts."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.directory = ckpt.directory

    def names(self) -> list[str]:
        """The tensors to convert (block scales travel with their weight; inv_freq is recomputed)."""
        return [n for n in self.ckpt.names() if not (layout.is_fp8_scale(n) or layout.is_recomputed(n))]

    def __contains__(self, name: object) -> bool:
        return name in self.ckpt

    def raw_names(self) -> list[str]:
        """Stored tensors copied byte for byte into the MTP file (none here)."""
        return []

    def stored(self, name: str) -> str:
        """The name `name` has in the files."""
        return name

    def path(self, name: str) -> Path:
        return self.ckpt.info(self.stored(name)).path

    def label(self, name: str) -> str:
        """How errors name the tensor: its stored name, and the runtime's when they differ."""
        return f"tensor '{name}'"

    def missing_label(self, name: str) -> str:
        return self.label(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape (a packed FP4 weight's unpacked one), from the header alone."""
        return self.ckpt.info(self.stored(name)).shape

    def is_integer(self, name: str) -> bool:
        """Integer tables (DeepSeek-V4's tid2eid) are kept as integers, never made float."""
        return self.ckpt.info(self.stored(name)).dtype in ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8") \
            and not name.endswith(".weight")

    def read_float32(self, name: str) -> np.ndarray:
        return read_float32(self.ckpt, name)

    def read_integer(self, name: str) -> np.ndarray:
        return self.ckpt.read(self.stored(name))

    def read_mxfp4(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(uint32 weight, uint8 scales) for a tensor stored as MX FP4 already; None otherwise."""
        return None

    def close(self) -> None:
        self.ckpt.close()


def write_raw_safetensors(path: Path, ckpt: Checkpoint, names: list[str]) -> None:
    """Copies tensors `names` of `ckpt` byte for byte (names, dtypes, shapes kept) into a new
    safetensors file, one tensor in memory at a time: for tensors kept as stored (the official
    MTP module), whose dtypes (FP8, E8M0, packed FP4) MLX cannot write."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = ckpt.info(name)
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(ckpt.read(name).tobytes())


@contextmanager
def staged_output(src: Path, dst: Path) -> Iterator[Path]:
    """Yields a hidden temporary directory beside DST. When the block succeeds, SRC's tokenizer
    files are copied in and it is renamed to DST; on any error it is removed, so a failed or
    interrupted run never leaves a half-written DST. A run killed outright (SIGKILL, power loss)
    cannot remove its directory: the next run to the same DST does."""
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        try:
            os.rename(tmp, dst)
        except OSError as e:  # another run wrote DST meanwhile
            raise EdgeDSError(f"{dst}: cannot create it ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_partials(dst: Path) -> list[Path]:
    """Removes the temporary directories of earlier runs to DST whose process is gone (a live one
    is a run still writing, and is left alone); returns those removed."""
    prefix = f".{dst.name}.partial-"
    try:
        leftovers = [p for p in dst.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for p in leftovers:
        pid = p.name[len(prefix):]
        if pid.isascii() and pid.isdigit() and len(pid) < 10 and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on Windows, assumed: os.kill there would terminate it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True
