"""What the converters share: writing their output so that DST appears complete or not at all,
the progress callback, the error for a tensor the checkpoint lacks."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from edge_ds import layout
from edge_ds.checkpoint import Checkpoint
from edge_ds.errors import EdgeDSError

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


def missing_tensor(ckpt: Checkpoint, name: str) -> EdgeDSError:
    """The error for tensor `name`, which config.json implies and `ckpt` lacks (an expert's says which)."""
    expert = layout.parse_expert(name)
    which = "" if expert is None else f"expert {expert[1]} of layer {expert[0]}: "
    return EdgeDSError(f"{ckpt.directory}: {which}tensor '{name}' is missing from the checkpoint")


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
