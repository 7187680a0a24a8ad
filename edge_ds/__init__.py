"""edge-ds: DeepSeek-architecture models (MLA + sparse MoE) on the device in front of you.

    import edge_ds
    lm = edge_ds.load("path/to/converted-model")   # or load() for the shipped default model
    print(lm.generate("Hello", max_tokens=40).text)

The names below are imported on first use, so that importing a light module of the package
(edge_ds.config, edge_ds.checkpoint, edge_ds.layout: what the converters need) does not load
MLX or a backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _blas  # noqa: F401  (must run before mlx is imported: see _blas.py)
from .errors import EdgeDSError, OptionError

_LAZY = {"load": "api", "LanguageModel": "api", "ChatSession": "api", "Generation": "api", "TextStream": "api",
         "GenerationStats": "generate", "SamplingOptions": "options"}

__all__ = [*_LAZY, "EdgeDSError", "OptionError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edge_ds' has no attribute {name!r}")
