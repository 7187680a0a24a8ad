"""The array library the generation loop, the samplers and perplexity compute in: MLX's
(`mlx.core`) or numpy's.

A backend says which one its __call__ takes and returns (`Backend.arrays`, "mlx" when it does
not say). MLX's keeps a step's sampling on the device and lets the next step be queued before
the token is read (mx.async_eval); numpy's is what a machine without MLX has (a CUDA server
running the torch backend), so nothing on that path imports MLX.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

MLX, NUMPY = "mlx", "numpy"


def library(backend: Any) -> ModuleType:
    """mlx.core or numpy: the array library `backend` computes in."""
    if getattr(backend, "arrays", MLX) == NUMPY:
        return np
    import mlx.core as mx

    return mx


def library_of(x: Any) -> ModuleType:
    """numpy for a numpy array, mlx.core for anything else (an MLX array)."""
    if isinstance(x, np.ndarray):
        return np
    import mlx.core as mx

    return mx


def evaluate(xp: ModuleType, *arrays: Any, wait: bool = True) -> None:
    """MLX computes lazily: start (wait=False) or finish computing `arrays`; numpy has nothing to do."""
    if xp is not np:
        (xp.eval if wait else xp.async_eval)(*arrays)
