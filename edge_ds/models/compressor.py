"""DeepSeek-V4's compressed attention branch and the cache it needs.

Every V4 layer attends to a sliding window of its last `sliding_window` tokens; a CSA or HCA
layer also attends to compressed entries, one per m tokens:

    entry_w = kv_norm( sum_j softmax_j(gate_j + position_bias_j) * kv_j )   over window w's m tokens

rotated (at its end) to position w * m. HCA (m = 128) attends to all of them. CSA (m = 4)
pools overlapping windows, entry w = window w-1's first series and window w's second series
(2m slots, two series per token), and a Lightning Indexer (its own pool of smaller keys)
picks the `index_topk` entries each query attends to.

The cache holds only what the model needs: the window's last sliding_window - 1 rows, the
compressed entries (and the indexer's keys), the tokens of the window not yet closed, and for
CSA the previous window's first series. It cannot be rewound token by token (a closed window
is pooled away, the window's older rows are gone). So it remembers where the last multi-token
call (a prompt's prefill) left it, by reference (entries are append-only, so their count is
enough): a rewind to that point or past it goes back to it, and the tokens after it are
recomputed (in a chat, the last reply, not the whole conversation); an earlier rewind empties it.
Every rank of a parallel run makes the same calls, so their caches go back to the same point.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import LatentCache
from ..config import CSA, DeepseekV4Config
from .indexer import index_scores
from .layers import Linear
from .rope import TailRoPE


class PoolState:
    """One gated pool's running state: tokens of the open window (their kv and gate projections,
    [B, <m, s*w]), the previous window's first series for CSA ([B, m, w]), and the entries so far."""

    def __init__(self):
        self.pending_kv = self.pending_gate = None
        self.overlap_kv = self.overlap_gate = None
        self.entries = LatentCache()  # [B, 1, T, w]

    @property
    def count(self) -> int:
        return self.entries.offset

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.pending_kv, self.pending_gate, self.overlap_kv, self.overlap_gate,
                            self.entries.state) if a is not None]


class V4LayerCache:
    """One V4 layer's cache: the window rows [B, 1, <= sliding_window - 1, head_dim] and, for a CSA or
    HCA layer, the states of its compressor (and indexer). Same bookkeeping as cache.LatentCache
    (offset, rewind, state, nbytes), so cache.PromptCache holds it."""

    def __init__(self, window: int, pools: tuple[str, ...]):
        self.keep = window - 1  # the newest query sees itself and the keep rows before it
        self.window: mx.array | None = None
        self.pools = {name: PoolState() for name in pools}
        self.offset = 0
        self.saved: tuple | None = None  # (offset, window, per pool: its four arrays and entry count)

    def advance(self, n: int) -> None:
        """The layer has taken n more tokens; after a multi-token call, remember this point."""
        self.offset += n
        if n > 1:
            self.saved = (self.offset, self.window, {
                name: (*(getattr(p, f) for f in self.FIELDS), p.entries.offset) for name, p in self.pools.items()})

    def update_window(self, new: mx.array) -> mx.array:
        """Appends rows [B, 1, L, hd]; returns the rows the new queries may see [B, 1, <= keep + L, hd]."""
        rows = new if self.window is None else mx.concatenate([self.window, new], axis=2)
        self.window = rows[:, :, max(0, rows.shape[2] - self.keep):]
        return rows

    def rewind(self, n: int) -> None:
        """Goes back to the point advance() remembered if that is no later than offset - n, else
        starts over from an empty cache; either way it may hold fewer tokens than asked
        (cache.PromptCache then forgets those, and they are recomputed)."""
        if n <= 0:
            return
        if self.saved is None or self.saved[0] > self.offset - n:
            self.__init__(self.keep + 1, tuple(self.pools))
            return
        self.offset, self.window, pools = self.saved
        for name, (*arrays, count) in pools.items():
            pool = self.pools[name]
            for f, a in zip(self.FIELDS, arrays):
                setattr(pool, f, a)
            pool.entries.rewind(pool.entries.offset - count)

    @property
    def state(self) -> mx.array | None:
        return self.window

    FIELDS = ("pending_kv", "pending_gate", "overlap_kv", "overlap_gate")

    def arrays(self) -> dict[str, mx.array]:
        """What cache.PromptCache.save writes: the window and each pool's state, by name."""
        out = {} if self.window is None else {"window": self.window}
        for name, pool in self.pools.items():
            out.update({f"{name}.{f}": getattr(pool, f) for f in self.FIELDS if getattr(pool, f) is not None})
            if pool.entries.state is not None:
                out[f"{name}.entries"] = pool.entries.state
        return out

    def restore(self, arrays: dict[str, mx.array], offset: int) -> None:
        """The inverse of arrays(), for a cache that had seen `offset` tokens."""
        unknown = set(arrays) - {"window"} - {f"{n}.{f}" for n in self.pools for f in (*self.FIELDS, "entries")}
        if unknown:
            raise KeyError(f"unexpected array '{sorted(unknown)[0]}'")
        self.window = arrays.get("window")
        if offset and (self.window is None or self.window.ndim != 4
                       or self.window.shape[2] != min(offset, self.keep)):
            raise ValueError(f"the window should hold {min(offset, self.keep)} rows")
        for name, pool in self.pools.items():
            for f in self.FIELDS:
                setattr(pool, f, arrays.get(f"{name}.{f}"))
            if f"{name}.entries" in arrays:
                pool.entries.update_and_fetch(arrays[f"{name}.entries"])
        self.offset = offset
        self.saved = None

    @property
    def nbytes(self) -> int:
        arrays = ([self.window] if self.window is not None else []) + [
            a for p in self.pools.values() for a in p.arrays()]
        return sum(a.nbytes for a in arrays)


class GatedPool(nn.Module):
    """Compresses every m tokens into one entry of `width` values: x [B, L, D] -> new entries
    [B, n, width] (n windows closed by these tokens) and the position of the first one.

    overlap (CSA): each token projects two series; entry w pools window w-1's first series with
    window w's second (2m slots). Window 0 of a sequence has no predecessor: those slots get
    weight 0."""

    def __init__(self, hidden: int, width: int, m: int, overlap: bool, eps: float):
        super().__init__()
        s = 2 if overlap else 1
        self.m, self.width, self.overlap = m, width, overlap
        self.kv_proj = Linear(hidden, s * width, bias=False)
        self.gate_proj = Linear(hidden, s * width, bias=False)
        self.position_bias = mx.zeros((m, s * width))
        self.kv_norm = nn.RMSNorm(width, eps=eps)

    def pool(self, x: mx.array, state: PoolState) -> tuple[mx.array | None, int]:
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # [B, L, s*w]
        if state.pending_kv is not None:
            kv = mx.concatenate([state.pending_kv, kv], axis=1)
            gate = mx.concatenate([state.pending_gate, gate], axis=1)
        m, w = self.m, self.width
        n = kv.shape[1] // m
        state.pending_kv, state.pending_gate = kv[:, n * m:], gate[:, n * m:]
        first = state.count * m
        if n == 0:
            return None, first
        B = kv.shape[0]
        kv = kv[:, : n * m].reshape(B, n, m, -1)  # [B, n, m, s*w]
        gate = gate[:, : n * m].reshape(B, n, m, -1).astype(mx.float32) + self.position_bias.astype(mx.float32)
        if self.overlap:
            prev_kv = state.overlap_kv if state.overlap_kv is not None else mx.zeros((B, m, w), kv.dtype)
            prev_gate = state.overlap_gate if state.overlap_gate is not None else mx.full((B, m, w), -mx.inf)
            state.overlap_kv, state.overlap_gate = kv[:, -1, :, :w], gate[:, -1, :, :w]
            first_kv = mx.concatenate([prev_kv[:, None], kv[:, :-1, :, :w]], axis=1)  # window w-1's first series
            first_gate = mx.concatenate([prev_gate[:, None], gate[:, :-1, :, :w]], axis=1)
            kv = mx.concatenate([first_kv, kv[..., w:]], axis=2)  # [B, n, 2m, w]
            gate = mx.concatenate([first_gate, gate[..., w:]], axis=2)
        weights = mx.softmax(gate, axis=2, precise=True)
        pooled = (kv.astype(mx.float32) * weights).sum(axis=2).astype(x.dtype)  # [B, n, w]
        return self.kv_norm(pooled), first


class Scorer(nn.Module):
    """The indexer's per-head weights: x [B, L, D] -> [B, L, heads] (scales folded in)."""

    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.weights_proj = Linear(hidden, heads, bias=False)
        self.scale = heads**-0.5 * head_dim**-0.5

    def __call__(self, x: mx.array) -> mx.array:
        return self.weights_proj(x).astype(mx.float32) * self.scale


def update(pool: GatedPool, x: mx.array, state: PoolState, rope: TailRoPE) -> None:
    """Pools the windows x [B, L, D] closes into state's entries, each roped at its window's start."""
    new, first = pool.pool(x, state)
    if new is not None:
        state.entries.update_and_fetch(rope(new, first + mx.arange(new.shape[1]) * pool.m)[:, None])


class Indexer(GatedPool):
    """CSA's Lightning Indexer: its own pool of small keys, scored against per-head queries."""

    def __init__(self, cfg: DeepseekV4Config, m: int, rope: TailRoPE):
        super().__init__(cfg.hidden_size, cfg.index_head_dim, m, True, cfg.rms_norm_eps)
        self.heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.q_b_proj = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.scorer = Scorer(cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim)
        self.rope = rope

    def __call__(self, x: mx.array, q_latent: mx.array, positions: mx.array, state: PoolState) -> mx.array:
        """x [B, L, D], q_latent [B, L, q_lora], positions [L] -> scores [B, L, T] over all T keys
        (pooled by update)."""
        keys = state.entries.state  # [B, 1, T, d]
        B, L, _ = x.shape
        q = self.q_b_proj(q_latent).reshape(B, L, self.heads, self.head_dim).swapaxes(1, 2)  # [B, h, L, d]
        q = self.rope(q, positions)
        return index_scores(q, self.scorer(x), keys)


class Compressor(GatedPool):
    """A CSA or HCA layer's compressed entries and which of them each query may attend to:
    x [B, L, D] -> (entries [B, 1, T, hd], mask [B, L, T] additive, or in CSA decode the chosen
    entries [B, 1, k] and whether each may be seen)."""

    def __init__(self, cfg: DeepseekV4Config, i: int, rope: TailRoPE):
        csa = cfg.layer_types[i] == CSA
        super().__init__(cfg.hidden_size, cfg.head_dim, cfg.compress_rate(i), csa, cfg.rms_norm_eps)
        self.csa = csa
        self.rope = rope
        if self.csa:
            self.indexer = Indexer(cfg, self.m, rope)

    def __call__(self, x: mx.array, q_latent: mx.array, positions: mx.array, cache: V4LayerCache):
        update(self, x, cache.pools["compressor"], self.rope)
        if self.csa:
            update(self.indexer, x, cache.pools["indexer"], self.rope)
        entries = cache.pools["compressor"].entries.state  # [B, 1, T, hd] or None
        if entries is None:
            return None, None
        T = entries.shape[2]
        # Entry w pools tokens up to w*m + m - 1: query p sees it once p has passed them.
        visible = mx.arange(T)[None] < ((positions + 1) // self.m)[:, None]  # [L, T]
        if not self.csa:
            return entries, mx.where(visible, 0.0, -mx.inf)[None]
        scores = self.indexer(x, q_latent, positions, cache.pools["indexer"])  # [B, L, T]
        scores = mx.where(visible, scores, -mx.inf)
        k = min(self.indexer.topk, T)
        chosen = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]  # [B, L, k]
        # Picks past what a query may see (fewer than k visible) are dropped, not attended.
        ok = mx.take_along_axis(mx.broadcast_to(visible, scores.shape), chosen, axis=-1)
        if x.shape[1] == 1:
            return entries, (chosen, ok)
        mask = mx.put_along_axis(mx.full(scores.shape, -mx.inf), chosen, mx.where(ok, 0.0, -mx.inf), axis=-1)
        return entries, mask
