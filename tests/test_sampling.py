"""Sampling tests: filters, reproducibility, empirical distributions, repetition penalty."""

import math

import mlx.core as mx
import numpy as np
import pytest

from edge_ds.errors import EdgeDSError
from edge_ds.sampling import apply_repetition_penalty, make_sampler, seed


def _logprobs(probs: list[float], rows: int = 1) -> mx.array:
    row = mx.log(mx.array(probs, dtype=mx.float32))
    return mx.broadcast_to(row, (rows, len(probs)))


def _draws(sampler, probs: list[float], n: int) -> np.ndarray:
    # One call over n identical rows: every row is an independent draw.
    out = sampler(_logprobs(probs, n))
    assert out.shape == (n,)
    return np.array(out)


def _random_logprobs(shape: tuple[int, int], key: int = 0) -> mx.array:
    logits = mx.random.normal(shape, key=mx.random.key(key)) * 3
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_greedy_is_argmax():
    lp = _random_logprobs((8, 1000))
    out = make_sampler(temperature=0.0)(lp)
    assert out.shape == (8,)
    assert np.array_equal(np.array(out), np.array(mx.argmax(lp, axis=-1)))


def test_top_k_1_is_argmax():
    lp = _random_logprobs((1, 300))
    many = mx.broadcast_to(lp, (500, 300))
    seed(0)
    out = np.array(make_sampler(temperature=1.0, top_k=1)(many))
    assert (out == int(mx.argmax(lp))).all()


def test_top_k_keeps_k_tokens_renormalised():
    probs = [0.4, 0.3, 0.2, 0.1]
    seed(1)
    out = _draws(make_sampler(temperature=1.0, top_k=2), probs, 20000)
    freq = np.bincount(out, minlength=4) / len(out)
    assert np.allclose(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0], atol=0.02)


def test_top_p_covering_top_token_returns_it():
    seed(2)
    out = _draws(make_sampler(temperature=1.0, top_p=0.5), [0.25, 0.6, 0.1, 0.05], 2000)
    assert (out == 1).all()


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = [0.6, 0.25, 0.1, 0.05]
    seed(3)
    out = _draws(make_sampler(temperature=1.0, top_p=0.8), probs, 20000)
    freq = np.bincount(out, minlength=4) / len(out)
    assert np.allclose(freq, [0.6 / 0.85, 0.25 / 0.85, 0, 0], atol=0.02)
    # Exactly reaching the mass is enough: 0.6 + 0.25 >= 0.85 keeps two tokens, not three.
    out = _draws(make_sampler(temperature=1.0, top_p=0.85 - 1e-6), probs, 5000)
    assert set(np.unique(out)) == {0, 1}


def test_top_p_applies_after_top_k():
    # After top_k=2 the survivors are 0.4/0.7 and 0.3/0.7; top_p=0.5 of that keeps only the first.
    seed(4)
    out = _draws(make_sampler(temperature=1.0, top_k=2, top_p=0.5), [0.4, 0.3, 0.2, 0.1], 2000)
    assert (out == 0).all()


def test_min_p_filters_unlikely_tokens():
    probs = [0.5, 0.3, 0.15, 0.05]  # min_p 0.2 -> threshold 0.1: drops only the last token
    seed(5)
    out = _draws(make_sampler(temperature=1.0, min_p=0.2), probs, 2000)
    assert 3 not in out
    assert set(np.unique(out)) == {0, 1, 2}


def test_min_tokens_to_keep():
    seed(6)
    out = _draws(make_sampler(temperature=1.0, top_p=0.1, min_tokens_to_keep=2), [0.6, 0.3, 0.1], 2000)
    assert set(np.unique(out)) == {0, 1}
    out = _draws(make_sampler(temperature=1.0, min_p=0.9, min_tokens_to_keep=2), [0.6, 0.3, 0.1], 2000)
    assert set(np.unique(out)) == {0, 1}


def test_seed_reproducible():
    lp = _random_logprobs((64, 50))
    sampler = make_sampler(temperature=1.0, top_p=0.95, top_k=40)
    seed(123)
    a = np.array(sampler(lp))
    b = np.array(sampler(lp))
    seed(123)
    assert np.array_equal(np.array(sampler(lp)), a)
    assert np.array_equal(np.array(sampler(lp)), b)
    seed(124)
    assert not np.array_equal(np.array(sampler(lp)), a)


def test_seed_none_is_noop():
    seed(7)
    first = np.array(mx.random.uniform(shape=(4,)))
    seed(7)
    seed(None)
    assert np.array_equal(np.array(mx.random.uniform(shape=(4,))), first)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution(temperature):
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    target = probs ** (1 / temperature)
    target /= target.sum()
    seed(8)
    out = _draws(make_sampler(temperature=temperature), probs.tolist(), 20000)
    freq = np.bincount(out, minlength=4) / len(out)
    assert np.abs(freq - target).max() < 0.02


def test_batch_rows_are_independent():
    lp = mx.concatenate([_logprobs([1.0, 0.0, 0.0]), _logprobs([0.0, 0.0, 1.0])])
    seed(9)
    out = make_sampler(temperature=1.0, top_p=0.9, min_p=0.05)(lp)
    assert out.tolist() == [0, 2]


def test_repetition_penalty():
    logits = mx.array([[2.0, -1.0, 0.5, -3.0, 1.0]])
    out = apply_repetition_penalty(logits, [0, 1, 1, 3], penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 1.0]]
    # Only the last context_size ids count.
    out = apply_repetition_penalty(logits, [0, 1, 4], penalty=2.0, context_size=2)
    assert out.tolist() == [[2.0, -2.0, 0.5, -3.0, 0.5]]
    # mx.array history, per row.
    batch = mx.concatenate([logits, logits])
    out = apply_repetition_penalty(batch, mx.array([[0], [3]]), penalty=2.0)
    assert out.tolist() == [[1.0, -1.0, 0.5, -3.0, 1.0], [2.0, -1.0, 0.5, -6.0, 1.0]]
    # A 1-D history applies to every row.
    out = apply_repetition_penalty(batch, [2], penalty=0.5)
    assert out[:, 2].tolist() == [1.0, 1.0]


def test_repetition_penalty_noops():
    logits = mx.array([[2.0, -1.0]])
    assert apply_repetition_penalty(logits, [0, 1], penalty=1.0) is logits
    assert apply_repetition_penalty(logits, [], penalty=1.3) is logits


# The library names its arguments; the CLI's flags for the same errors: test_cli_errors.py.
@pytest.mark.parametrize("kwargs, option", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_tokens_to_keep": 0}, "min_tokens_to_keep"),
])
def test_invalid_options(kwargs, option):
    with pytest.raises(EdgeDSError, match=option):
        make_sampler(**kwargs)


def test_top_p_message():
    with pytest.raises(EdgeDSError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        make_sampler(top_p=1.5)


@pytest.mark.parametrize("penalty", [0.0, -1.0])
def test_invalid_repetition_penalty(penalty):
    with pytest.raises(EdgeDSError, match="repetition_penalty"):
        apply_repetition_penalty(mx.zeros((1, 4)), [1], penalty)


def test_filters_are_shift_invariant():
    """generate.py hands samplers raw logits (no logsumexp): every filter must keep the same
    tokens for logits and for log-probabilities."""
    from edge_ds.sampling import _min_p, _top_k, _top_p

    logits = mx.array(np.random.default_rng(0).normal(0, 3, (4, 500)).astype(np.float32)) + 11.0
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for keep in (lambda x: _top_k(x, 20), lambda x: _top_p(x, 0.9, 1), lambda x: _min_p(x, 0.05, 1),
                 lambda x: x):
        a, b = keep(logits), keep(logprobs)
        np.testing.assert_array_equal(np.isfinite(np.array(a)), np.isfinite(np.array(b)))
        np.testing.assert_array_equal(np.array(mx.argmax(a, axis=-1)), np.array(mx.argmax(b, axis=-1)))


# numpy logits (a backend that computes in numpy, e.g. torch on a machine without MLX): the same
# filters, checked against a direct reading of each definition, and numpy's own draws.
def _kept_by_definition(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Row by row, in float64: the k largest, then the smallest most-likely set reaching top_p of
    what is left, then p >= min_p * p_max among what is left."""
    keep = np.ones(logits.shape, bool)
    for r, row in enumerate(logits.astype(np.float64)):
        alive = np.ones(row.shape, bool)
        if top_k:
            alive[np.argsort(-row)[top_k:]] = False
        if top_p < 1.0:
            p = np.where(alive, np.exp(row - row[alive].max()), 0.0)
            p /= p.sum()
            order = np.argsort(-p)
            before = np.cumsum(p[order]) - p[order]
            alive[order[before >= top_p]] = False
        if min_p > 0.0:
            p = np.where(alive, np.exp(row - row[alive].max()), 0.0)
            alive &= p >= min_p * p.max()
        keep[r] = alive
    return keep


@pytest.mark.parametrize("library", ["numpy", "mlx"])
@pytest.mark.parametrize("filters", [{"top_k": 20}, {"top_p": 0.8}, {"min_p": 0.05},
                                     {"top_k": 50, "top_p": 0.9, "min_p": 0.02}])
def test_filters_keep_what_their_definition_keeps(library, filters):
    from edge_ds.sampling import _min_p, _top_k, _top_p

    logits = np.random.default_rng(3).normal(0, 2, (6, 400)).astype(np.float32)
    x = logits if library == "numpy" else mx.array(logits)
    if filters.get("top_k"):
        x = _top_k(x, filters["top_k"])
    if filters.get("top_p"):
        x = _top_p(x, filters["top_p"], 1)
    if filters.get("min_p"):
        x = _min_p(x, filters["min_p"], 1)
    assert isinstance(x, np.ndarray) == (library == "numpy")
    np.testing.assert_array_equal(np.isfinite(np.array(x)), _kept_by_definition(logits, **filters))


def test_numpy_logits_are_sampled_in_numpy():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    target = probs ** 2 / (probs ** 2).sum()  # temperature 0.5
    rows = np.broadcast_to(np.log(probs).astype(np.float32), (20000, 4))
    seed(8)
    out = make_sampler(temperature=0.5)(rows)
    assert isinstance(out, np.ndarray) and out.shape == (20000,)
    assert np.abs(np.bincount(out, minlength=4) / len(out) - target).max() < 0.02
    seed(5)
    a = make_sampler(temperature=1.0, top_p=0.9)(rows[:50])
    seed(5)
    b = make_sampler(temperature=1.0, top_p=0.9)(rows[:50])
    np.testing.assert_array_equal(a, b)
    assert make_sampler(0.0)(rows[:2]).tolist() == [0, 0]


def test_repetition_penalty_on_numpy_logits():
    logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0]], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 3], penalty=2.0)
    assert isinstance(out, np.ndarray) and out.tolist() == [[1.0, -2.0, 0.5, -6.0, 1.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, -3.0, 1.0]]  # the caller's array is left as it was
    batch = np.concatenate([logits, logits])
    out = apply_repetition_penalty(batch, np.array([[0], [3]]), penalty=2.0)
    assert out.tolist() == [[1.0, -1.0, 0.5, -3.0, 1.0], [2.0, -1.0, 0.5, -6.0, 1.0]]
