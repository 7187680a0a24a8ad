"""Multi-head Latent Attention over a latent cache.

Per token the cache holds only [c_kv (normalised, kv_lora), k_pe (roped, rope)] per layer.
Two equivalent forms:
- absorbed (decode): W_UK is folded into the query, so each head attends straight over the
  latent rows: MQA with one (kv_lora + rope)-wide key and a kv_lora-wide value;
- expanded (prefill): keys and values are expanded per head through kv_b_proj, cheaper
  when many queries share the same keys.
With DeepSeek Sparse Attention (deepseek_v32) the row also holds the indexer's key, and each
query attends only to the rows its Lightning Indexer picks (indexer.py): decode gathers those
rows, so its attention reads at most index_topk of them; prefill masks the rest.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .indexer import LightningIndexer
from .layers import HeadLinear, Linear, dense_prefill, matmul
from .rope import RoPE


class MLA(nn.Module):
    """x [B, L, D] -> [B, L, D]; `cache` is this layer's LatentCache or None (no cache)."""

    def __init__(self, cfg: ModelConfig, kv_b_rows: bool = False):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.scale = cfg.softmax_scale
        H, qk = self.num_heads, cfg.qk_head_dim
        bias = cfg.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, H * qk, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=1e-6)  # as transformers: not rms_norm_eps
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.latent_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        # kv_b_proj split per head: W_UK (latent <-> nope) and W_UV (latent -> v). embed_q holds
        # W_UK as mlx-lm's [H, kv_lora, nope], or with kv_b_rows as kv_b_proj's own rows
        # [H, nope, kv_lora] (exact for a quantized kv_b_proj, whose groups run along kv_lora).
        self.kv_b_rows = kv_b_rows
        if kv_b_rows:
            self.embed_q = HeadLinear(self.kv_lora_rank, self.nope_dim, H)
        else:
            self.embed_q = HeadLinear(self.nope_dim, self.kv_lora_rank, H)
        self.unembed_out = HeadLinear(self.kv_lora_rank, self.v_dim, H)
        self.o_proj = Linear(H * self.v_dim, cfg.hidden_size, bias=bias)
        self.rope = RoPE(self.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.latent_dim = cfg.latent_dim
        if cfg.sparse_attention:
            self.indexer = LightningIndexer(cfg)

    def nope_to_latent(self, q_nope: mx.array) -> mx.array:
        """[B, H, L, nope] -> [B, H, L, kv_lora]: q_nope_h @ W_UK_h."""
        return self.embed_q(q_nope, transpose=not self.kv_b_rows)

    def latent_to_nope(self, c: mx.array) -> mx.array:
        """[B, 1, T, kv_lora] -> [B, H, T, nope]: the expanded keys W_UK_h c."""
        return self.embed_q(c, transpose=self.kv_b_rows)

    def __call__(self, x: mx.array, mask: mx.array | None, cache=None) -> mx.array:
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))  # [B, L, q_lora]
            q = self.q_b_proj(q_latent)
        q = q.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, qk]
        q_nope, q_pe = mx.split(q, [self.nope_dim], axis=-1)

        c, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        c = self.kv_a_layernorm(c)[:, None]  # [B, 1, L, kv_lora]
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe[:, None], offset)  # [B, 1, L, rope]

        row = [c, k_pe]
        if "indexer" in self:
            row.append(self.indexer.keys(x, offset))  # [B, 1, L, index_head_dim]
        rows = mx.concatenate(row, axis=-1)  # [B, 1, L, cache_row_dim]
        if cache is not None:
            rows = cache.update_and_fetch(rows)  # [B, 1, T, cache_row_dim]
        latent = rows[..., : self.latent_dim]  # [B, 1, T, kv_lora + rope]

        chosen = None  # [B, L, topk] rows each query reads, or None: all it may see
        if "indexer" in self:
            # A batch's per-row mask [B, 1, 1, T] (each row's padding) reaches the indexer as [B, 1, T].
            index_mask = mask[:, 0] if mask is not None and mask.ndim == 4 else mask
            chosen = self.indexer(x, q_latent, rows[..., self.latent_dim:], offset, index_mask)

        if L == 1:
            if chosen is not None:  # read only the chosen rows: attention work bounded by index_topk
                chosen = mx.sort(chosen, axis=-1)  # in cache order, whatever order the selection gave
                rows_of = chosen[:, None, 0, :, None]  # [B, 1, topk, 1]
                rows_of = mx.broadcast_to(rows_of, (*rows_of.shape[:3], latent.shape[-1]))
                latent = mx.take_along_axis(latent, rows_of, axis=2)  # [B, 1, topk, kv_lora + rope]
                if mask is not None:  # a batch: each row's padding mask, at its chosen rows
                    mask = mx.take_along_axis(mask, chosen[:, None, :, :], axis=-1)  # [B, 1, 1, topk]
            out = self._absorbed(q_nope, q_pe, latent, latent[..., : self.kv_lora_rank], mask)
        else:
            if chosen is not None:
                mask = _and_chosen(mask, chosen, latent.shape[2])
            c_all, k_pe_all = mx.split(latent, [self.kv_lora_rank], axis=-1)
            out = self._expanded(q_nope, q_pe, c_all, k_pe_all, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _absorbed(self, q_nope, q_pe, latent, c_all, mask):
        q = mx.concatenate([self.nope_to_latent(q_nope), q_pe], axis=-1)  # [B, H, L, kv_lora + rope]
        scores = (q * self.scale) @ latent.swapaxes(-1, -2)  # [B, H, L, T]
        p = _softmax(scores, mask)
        return self.unembed_out(p @ c_all)  # [B, H, L, v]

    def _expanded(self, q_nope, q_pe, c_all, k_pe_all, mask):
        # Prefill: the [L, T] products are large, so on a CPU without a fast BLAS they go through numpy's.
        mm = matmul if dense_prefill(q_nope.shape[2]) else mx.matmul
        k_nope = self.latent_to_nope(c_all)  # [B, H, T, nope]
        v = self.unembed_out(c_all)  # [B, H, T, v]
        scores = mm(q_nope * self.scale, k_nope.swapaxes(-1, -2))
        scores = scores + mm(q_pe * self.scale, k_pe_all.swapaxes(-1, -2))  # k_pe is shared by all heads
        p = _softmax(scores, mask)
        return mm(p, v)


def _and_chosen(mask: mx.array | None, chosen: mx.array, T: int) -> mx.array:
    """The boolean mask [B, 1, L, T] of rows a query may see (mask) and its indexer chose."""
    B, L, _ = chosen.shape
    keep = mx.put_along_axis(mx.zeros((B, L, T), mx.bool_), chosen, mx.array(True), axis=-1)[:, None]
    if mask is None:
        return keep
    return keep & (mask if mask.dtype == mx.bool_ else mask == 0)


def _softmax(scores: mx.array, mask: mx.array | None) -> mx.array:
    if mask is not None:
        scores = scores + mask if mask.dtype != mx.bool_ else mx.where(mask, scores, -mx.inf)
    return mx.softmax(scores, axis=-1, precise=True)
