"""Token sampling (greedy, temperature, top-k, top-p, min-p) and repetition penalty, in MLX."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx

from .options import check_filters, check_repetition

Sampler = Callable[[mx.array], mx.array]


def _top_k(logits: mx.array, k: int) -> mx.array:
    """Mask everything outside the k largest entries of each row to -inf."""
    if k >= logits.shape[-1]:
        return logits
    # argpartition gives exactly k survivors even when values tie at the boundary.
    drop = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, drop, mx.array(-mx.inf, logits.dtype), axis=-1)


def _top_p(logits: mx.array, top_p: float, min_keep: int) -> mx.array:
    """Keep the smallest highest-probability set whose mass reaches top_p."""
    order = mx.argsort(-logits, axis=-1)
    # Renormalise over what earlier filters kept, so top_p is a share of the remaining mass.
    probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    rank = mx.arange(probs.shape[-1])
    keep_sorted = (mass_before < top_p) | (rank < min_keep)
    keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def _min_p(logits: mx.array, min_p: float, min_keep: int) -> mx.array:
    """Keep tokens with p >= min_p * p_max (compared in log space)."""
    threshold = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    if min_keep > 1:
        kth = mx.min(mx.topk(logits, min(min_keep, logits.shape[-1]), axis=-1), axis=-1, keepdims=True)
        threshold = mx.minimum(threshold, kth)
    return mx.where(logits >= threshold, logits, -mx.inf)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 min_tokens_to_keep: int = 1) -> Sampler:
    """Return f(logits [B, V]) -> token ids [B]; temperature 0 means greedy. Every filter is
    shift-invariant, so logits need not be normalised to log-probabilities."""
    check_filters(temperature, top_p, top_k, min_p, min_tokens_to_keep)
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    k = max(top_k, min_tokens_to_keep) if top_k > 0 else 0
    inv_temp = 1.0 / temperature

    def sample(logits: mx.array) -> mx.array:
        if k:
            logits = _top_k(logits, k)
        if top_p < 1.0:
            logits = _top_p(logits, top_p, min_tokens_to_keep)
        if min_p > 0.0:
            logits = _min_p(logits, min_p, min_tokens_to_keep)
        return mx.random.categorical(logits * inv_temp, axis=-1)

    return sample


def apply_repetition_penalty(logits: mx.array, history: Sequence[int] | mx.array, penalty: float,
                             context_size: int = 64) -> mx.array:
    """CTRL-style penalty on ids seen in the last context_size tokens.

    history is 1-D (shared by every row of logits) or [B, T] (one history per row).
    """
    check_repetition(penalty, context_size)
    if penalty == 1.0:
        return logits
    if isinstance(history, mx.array):
        ids = history[..., -context_size:].astype(mx.int32)
    else:
        recent = history[-context_size:] if isinstance(history, (list, tuple)) else list(history)[-context_size:]
        ids = mx.array([int(i) for i in recent], dtype=mx.int32)
    if ids.size == 0:
        return logits
    if ids.ndim < logits.ndim:
        ids = mx.broadcast_to(ids, (*logits.shape[:-1], ids.shape[-1]))
    seen = mx.take_along_axis(logits, ids, axis=-1)
    # Dividing a positive logit and multiplying a negative one both make the token less likely.
    seen = mx.where(seen < 0, seen * penalty, seen / penalty)
    return mx.put_along_axis(logits, ids, seen, axis=-1)


def seed(value: int | None) -> None:
    """Seed MLX's global RNG so sampling is reproducible; None leaves it alone."""
    if value is not None:
        mx.random.seed(value)
