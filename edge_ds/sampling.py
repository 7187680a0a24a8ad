"""Token sampling (greedy, temperature, top-k, top-p, min-p) and repetition penalty, in the array
library of the logits they are given (MLX's, or numpy's where a backend computes in numpy: see
arrays.py)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

from .arrays import library_of
from .options import check_filters, check_repetition

Sampler = Callable[[Any], Any]  # logits [B, V] -> token ids [B], both of one array library

_rng = np.random.default_rng()  # numpy's draws (MLX's come from its own global generator)


def _put_along_last(xp: ModuleType, a: Any, indices: Any, values: Any) -> Any:
    """A copy of `a` with values written at `indices` along the last axis (numpy's
    put_along_axis writes in place, MLX's returns a new array)."""
    if xp is np:
        out = a.copy()
        np.put_along_axis(out, indices, values, axis=-1)
        return out
    return xp.put_along_axis(a, indices, values, axis=-1)


def _softmax(xp: ModuleType, x: Any) -> Any:
    if xp is np:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return xp.softmax(x, axis=-1)


def _kth_largest(xp: ModuleType, x: Any, k: int) -> Any:
    """The k-th largest entry of each row, [..., 1]."""
    if xp is np:
        n = x.shape[-1]
        return np.partition(x, n - k, axis=-1)[..., n - k:n - k + 1]
    return xp.min(xp.topk(x, k, axis=-1), axis=-1, keepdims=True)


def _categorical(xp: ModuleType, logits: Any) -> Any:
    """One draw per row from softmax(logits)."""
    if xp is np:  # the Gumbel-max trick: argmax(logits + Gumbel noise) is a draw from softmax(logits)
        return np.argmax(logits + _rng.gumbel(size=logits.shape).astype(logits.dtype), axis=-1)
    return xp.random.categorical(logits, axis=-1)


def _top_k(logits: Any, k: int) -> Any:
    """Mask everything outside the k largest entries of each row to -inf."""
    if k >= logits.shape[-1]:
        return logits
    xp = library_of(logits)
    # argpartition gives exactly k survivors even when values tie at the boundary.
    drop = xp.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return _put_along_last(xp, logits, drop, xp.array(-math.inf, dtype=logits.dtype))


def _top_p(logits: Any, top_p: float, min_keep: int) -> Any:
    """Keep the smallest highest-probability set whose mass reaches top_p."""
    xp = library_of(logits)
    order = xp.argsort(-logits, axis=-1)
    # Renormalise over what earlier filters kept, so top_p is a share of the remaining mass.
    probs = _softmax(xp, xp.take_along_axis(logits, order, axis=-1))
    mass_before = xp.cumsum(probs, axis=-1) - probs
    rank = xp.arange(probs.shape[-1])
    keep_sorted = (mass_before < top_p) | (rank < min_keep)
    keep = _put_along_last(xp, xp.zeros(logits.shape, dtype=xp.bool_), order, keep_sorted)
    return xp.where(keep, logits, -math.inf)


def _min_p(logits: Any, min_p: float, min_keep: int) -> Any:
    """Keep tokens with p >= min_p * p_max (compared in log space)."""
    xp = library_of(logits)
    threshold = xp.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    if min_keep > 1:
        threshold = xp.minimum(threshold, _kth_largest(xp, logits, min(min_keep, logits.shape[-1])))
    return xp.where(logits >= threshold, logits, -math.inf)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 min_tokens_to_keep: int = 1) -> Sampler:
    """Return f(logits [B, V]) -> token ids [B]; temperature 0 means greedy. Every filter is
    shift-invariant, so logits need not be normalised to log-probabilities."""
    check_filters(temperature, top_p, top_k, min_p, min_tokens_to_keep)
    if temperature == 0:
        return lambda logits: library_of(logits).argmax(logits, axis=-1)

    k = max(top_k, min_tokens_to_keep) if top_k > 0 else 0
    inv_temp = 1.0 / temperature

    def sample(logits: Any) -> Any:
        if k:
            logits = _top_k(logits, k)
        if top_p < 1.0:
            logits = _top_p(logits, top_p, min_tokens_to_keep)
        if min_p > 0.0:
            logits = _min_p(logits, min_p, min_tokens_to_keep)
        return _categorical(library_of(logits), logits * inv_temp)

    return sample


def apply_repetition_penalty(logits: Any, history: Sequence[int] | Any, penalty: float,
                             context_size: int = 64) -> Any:
    """CTRL-style penalty on ids seen in the last context_size tokens.

    history is 1-D (shared by every row of logits) or [B, T] (one history per row): a sequence of
    ints or an array.
    """
    check_repetition(penalty, context_size)
    if penalty == 1.0:
        return logits
    xp = library_of(logits)
    if hasattr(history, "shape"):  # an array (MLX's or numpy's)
        ids = xp.array(history[..., -context_size:]).astype(xp.int32)
    else:
        recent = history[-context_size:] if isinstance(history, (list, tuple)) else list(history)[-context_size:]
        ids = xp.array([int(i) for i in recent], dtype=xp.int32)
    if ids.size == 0:
        return logits
    if ids.ndim < logits.ndim:
        ids = xp.broadcast_to(ids, (*logits.shape[:-1], ids.shape[-1]))
    seen = xp.take_along_axis(logits, ids, axis=-1)
    # Dividing a positive logit and multiplying a negative one both make the token less likely.
    seen = xp.where(seen < 0, seen * penalty, seen / penalty)
    return _put_along_last(xp, logits, ids, seen)


def seed(value: int | None) -> None:
    """Seed the random draws (MLX's global generator where MLX is installed, and numpy's) so
    sampling is reproducible; None leaves them alone."""
    global _rng
    if value is None:
        return
    _rng = np.random.default_rng(value)
    try:
        import mlx.core as mx
    except ImportError:  # a machine without MLX samples in numpy only
        return
    mx.random.seed(value)
