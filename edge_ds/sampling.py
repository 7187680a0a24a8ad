"""Token sampling (greedy, temperature, top-k, top-p, min-p) and repetition penalty, in MLX."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx

from edge_ds.errors import EdgeDSError

Sampler = Callable[[mx.array], mx.array]


def _check_options(temperature: float, top_p: float, top_k: int, min_p: float,
                   min_tokens_to_keep: int) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise EdgeDSError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise EdgeDSError(f"--top-p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise EdgeDSError(f"--top-k must be an integer >= 0, got {top_k}")
    if not 0 <= min_p <= 1:
        raise EdgeDSError(f"--min-p must be in [0, 1], got {min_p}")
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) \
            or min_tokens_to_keep < 1:
        raise EdgeDSError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep}")


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    """Mask everything outside the k largest entries of each row to -inf."""
    if k >= logprobs.shape[-1]:
        return logprobs
    # argpartition gives exactly k survivors even when values tie at the boundary.
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, drop, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def _top_p(logprobs: mx.array, top_p: float, min_keep: int) -> mx.array:
    """Keep the smallest highest-probability set whose mass reaches top_p."""
    order = mx.argsort(-logprobs, axis=-1)
    # Renormalise over what earlier filters kept, so top_p is a share of the remaining mass.
    probs = mx.softmax(mx.take_along_axis(logprobs, order, axis=-1), axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    rank = mx.arange(probs.shape[-1])
    keep_sorted = (mass_before < top_p) | (rank < min_keep)
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def _min_p(logprobs: mx.array, min_p: float, min_keep: int) -> mx.array:
    """Keep tokens with p >= min_p * p_max (compared in log space)."""
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    if min_keep > 1:
        kth = mx.min(mx.topk(logprobs, min(min_keep, logprobs.shape[-1]), axis=-1), axis=-1, keepdims=True)
        threshold = mx.minimum(threshold, kth)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 min_tokens_to_keep: int = 1) -> Sampler:
    """Return f(logits [B, V]) -> token ids [B]; temperature 0 means greedy. Every filter is
    shift-invariant, so logits need not be normalised to log-probabilities."""
    _check_options(temperature, top_p, top_k, min_p, min_tokens_to_keep)
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    k = max(top_k, min_tokens_to_keep) if top_k > 0 else 0
    inv_temp = 1.0 / temperature

    def sample(logprobs: mx.array) -> mx.array:
        if k:
            logprobs = _top_k(logprobs, k)
        if top_p < 1.0:
            logprobs = _top_p(logprobs, top_p, min_tokens_to_keep)
        if min_p > 0.0:
            logprobs = _min_p(logprobs, min_p, min_tokens_to_keep)
        return mx.random.categorical(logprobs * inv_temp, axis=-1)

    return sample


def apply_repetition_penalty(logits: mx.array, history: Sequence[int] | mx.array, penalty: float,
                             context_size: int = 64) -> mx.array:
    """CTRL-style penalty on ids seen in the last context_size tokens.

    history is 1-D (shared by every row of logits) or [B, T] (one history per row).
    """
    if not penalty > 0:
        raise EdgeDSError(f"--repetition-penalty must be > 0, got {penalty}")
    if context_size < 1:
        raise EdgeDSError(f"--repetition-context-size must be >= 1, got {context_size}")
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
