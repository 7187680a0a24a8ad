"""The backends: one module each, found by name (see edge_ds/backend.py for what a module offers).

Light on purpose: the CLI lists the names without loading MLX or any backend's library.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EdgeDSError, OptionError

if TYPE_CHECKING:
    from ..backend import Backend, ExpertOptions

DEFAULT = "mlx"  # reads every model directory edge-ds writes or reads, on every platform


def names() -> list[str]:
    """The backends this installation has (their modules are not imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def default_backend(directory: Path) -> str:
    """The backend load() picks when none is named (see why_default)."""
    return why_default(directory)[0]


def apple_silicon() -> bool:
    """Where MLX runs on Metal with unified memory: there it is the fast backend. Elsewhere MLX runs
    on its CPU backend, and an onnxruntime export of the same model is several times faster."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def why_default(directory: Path) -> tuple[str, str]:
    """(backend, why): MLX on Apple Silicon (Metal, unified memory). Elsewhere a backend whose own
    export the directory holds (an onnxruntime export: its 4-bit CPU kernels are far faster than
    MLX's CPU backend), else MLX."""
    if apple_silicon():
        return DEFAULT, "Apple Silicon: Metal and unified memory"
    for name in names():
        if name == DEFAULT:
            continue
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # its runtime is not installed here (MLX on a CUDA server, onnxruntime)
            continue
        if module.detect(directory):
            return name, f"the directory holds its {name} export, faster than MLX on this CPU"
    return DEFAULT, "no faster export in the directory"


def choose(name: str | None, directory: Path, experts: ExpertOptions | None = None) -> tuple[str, str]:
    """(backend, why) for a load: the one named, MLX for lazy experts, else default_backend's."""
    if name is not None:
        return name, "asked for"
    if experts is not None:
        return DEFAULT, "lazy experts run on MLX"
    return why_default(directory)


def open_backend(name: str, directory: Path, experts: ExpertOptions | None = None, **options) -> Backend:
    """The model in `directory` on backend `name` (see choose); `options` are that backend's own
    load() keywords (the torch backend's device, gemm, dtype)."""
    available = names()
    if name not in available:
        raise OptionError("backend", f"{{option}} {name!r} is not available in this build "
                                     f"(available: {', '.join(available)})")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:  # its runtime is not installed (MLX on a CUDA server, say)
        raise EdgeDSError(f"the {name} backend needs {(e.name or 'a package').split('.')[0]}, which is not installed here"
                          + ("" if name == "torch" else "; the torch backend runs Hugging Face checkpoints "
                             "without it (backend torch, pip install -e \".[torch]\")")) from None
    accepted = inspect.signature(module.load).parameters
    for option in options:
        if option not in accepted or option in ("directory", "experts"):
            raise OptionError(option, f"{{option}} is not an option of the {name} backend")
    return module.load(directory, experts, **options)
