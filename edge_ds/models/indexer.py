"""DeepSeek Sparse Attention's Lightning Indexer (deepseek_v32): which cached rows each query reads.

Each query t scores every visible row s with a few cheap heads,

    index[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]),   w = weights_proj(x) / sqrt(H * head_dim)

and attends only to its top `topk` rows. The index key k[s] (head_dim values per token) is
cached beside the latent row. Up to topk rows every row is kept, so the model is dense
DeepSeek-V3 there. DeepSeek's own kernel rotates q and k by a Hadamard transform and scores
in FP8; the rotation is orthogonal (dot products unchanged) and FP8 is a precision choice, so
the scores here are the float scores that both approximate, computed in float32.

index_scores and top_rows take keys from anywhere, so an attention with other keys (DeepSeek-V4's
compressed entries) reuses them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .layers import Linear, matmul
from .rope import RoPE


def index_scores(q: mx.array, weights: mx.array, keys: mx.array) -> mx.array:
    """q [B, H, L, d], weights [B, L, H] (scale folded in), keys [B, 1, T, d] -> scores [B, L, T] (float32)."""
    q, keys, weights = q.astype(mx.float32), keys.astype(mx.float32), weights.astype(mx.float32)
    if q.shape[2] == 1:  # decode: all heads at once is small
        per_head = mx.maximum(matmul(q, keys.swapaxes(-1, -2)), 0)  # [B, H, 1, T]
        return (per_head * weights.swapaxes(-1, -2)[..., None]).sum(axis=1)
    # Prefill: one head at a time, so memory is [B, L, T] and not H times that.
    total = None
    for h in range(q.shape[1]):
        part = mx.maximum(matmul(q[:, h], keys[:, 0].swapaxes(-1, -2)), 0) * weights[..., h:h + 1]  # [B, L, T]
        total = part if total is None else total + part
    return total


def top_rows(scores: mx.array, topk: int, mask: mx.array | None = None) -> mx.array | None:
    """The `topk` best rows per query: scores [B, L, T] (mask: additive or boolean [L, T], the rows
    a query may see) -> indices [B, L, topk], or None when T <= topk (every row is kept).

    A query that sees fewer than topk rows gets some it may not see; the attention's own mask
    removes them, as in DeepSeek's reference."""
    if scores.shape[-1] <= topk:
        return None
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return mx.argpartition(-scores, kth=topk - 1, axis=-1)[..., :topk]


class LightningIndexer(nn.Module):
    """Scores and selects the rows each query attends to. keys(x, offset) makes the rows to cache;
    __call__ selects among all cached keys."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim = cfg.qk_rope_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, bias=False)
        # The indexer ropes the halves of its first rope_dim values (MLA ropes interleaved pairs).
        self.rope = RoPE(self.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                         traditional=False)
        self.scale = (self.n_heads * self.head_dim) ** -0.5

    def _roped(self, x: mx.array, offset: int) -> mx.array:
        """Rotates the first rope_dim values of x [B, H, L, head_dim]."""
        pe, rest = mx.split(x, [self.rope_dim], axis=-1)
        return mx.concatenate([self.rope(pe, offset), rest], axis=-1)

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """x [B, L, D] -> index keys [B, 1, L, head_dim] of tokens at offset.."""
        return self._roped(self.k_norm(self.wk(x))[:, None], offset)

    def __call__(self, x: mx.array, q_latent: mx.array, keys: mx.array, offset: int,
                 mask: mx.array | None) -> mx.array | None:
        """x [B, L, D], q_latent [B, L, q_lora] (MLA's normalised query latent), keys [B, 1, T, head_dim]
        (all cached) -> row indices [B, L, topk], or None when all T rows are kept."""
        if keys.shape[2] <= self.topk:
            return None
        B, L, _ = x.shape
        q = self.wq_b(q_latent).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, H, L, d]
        weights = self.weights_proj(x) * self.scale  # [B, L, H]
        return top_rows(index_scores(self._roped(q, offset), weights, keys), self.topk, mask)
