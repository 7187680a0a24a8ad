"""Wired memory on Apple Silicon: keep the model's buffers resident while it runs.

macOS may page out or compress GPU buffers it has not touched for a while; a wired limit asks
it to keep up to that many bytes of MLX buffers resident. With lazy experts this is what the
budget is for: the trunk and the expert slots stay put, and only misses read from disk.
Elsewhere (Linux CPU, CUDA) there is nothing to wire and these calls do nothing.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

HEADROOM = 1.25  # room for the latent cache and activations on top of the weights


def wire(model, extra_bytes: int = 0) -> int | None:
    """Sets MLX's wired limit to the model's parameters plus extra_bytes (lazy experts' slots) plus
    headroom, capped at the system's limit (device_info's max_recommended_working_set_size);
    returns the limit set, or None without Metal."""
    if not mx.metal.is_available():
        return None
    cap = int(mx.device_info().get("max_recommended_working_set_size", 0))
    if cap <= 0:
        return None
    limit = min(int((parameter_bytes(model) + extra_bytes) * HEADROOM), cap)
    mx.set_wired_limit(limit)
    return limit


def parameter_bytes(model) -> int:
    """Bytes of the model's resident parameters (lazy experts' slots are not parameters)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
