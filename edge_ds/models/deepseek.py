"""The DeepSeek decoder (deepseek_v2, deepseek_v3, kimi_k2): MLA + dense/MoE feed-forward."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import layout
from ..cache import PromptCache
from ..config import ModelConfig
from ..errors import EdgeDSError
from .layers import Linear
from .mla import MLA
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h)); x [B, L, D]."""

    def __init__(self, cfg: ModelConfig, index: int, kv_b_rows: bool = False):
        super().__init__()
        self.self_attn = MLA(cfg, kv_b_rows)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig, kv_b_rows: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i, kv_b_rows) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class Model(nn.Module):
    """token ids [B, L] -> logits [B, L, vocab]; `cache` is a list of per-layer LatentCaches.

    kv_b_rows: the checkpoint keeps kv_b_proj whole (see layout.kv_b_as_rows), so MLA holds W_UK
    as its rows; otherwise as mlx-lm's embed_q."""

    def __init__(self, cfg: ModelConfig, kv_b_rows: bool = False):
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg, kv_b_rows)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dtype = mx.float32

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> PromptCache:
        return PromptCache(self.config.num_hidden_layers)

    def __call__(self, tokens: mx.array, cache: list | None = None, mask: mx.array | None = None,
                 last_only: bool = False) -> mx.array:
        """last_only: logits of the last position only, [B, 1, vocab] (generation reads no other;
        the head is a large share of a CPU prefill chunk)."""
        h = self.model.embed_tokens(tokens).astype(self.dtype)  # [B, L, D]
        L = h.shape[1]
        offset = cache[0].offset if cache else 0
        if mask is None and L > 1:
            mask = causal_mask(L, offset, self.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None)
        h = self.model.norm(h[:, -1:] if last_only else h)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names (Hugging Face or mlx-lm layout) -> this module's parameter names: the
        MTP module and recomputed tensors are dropped, per-expert tensors stacked into switch_mlp,
        a whole kv_b_proj split into embed_q (its W_UK rows) and unembed_out."""
        cfg = self.config
        out = stack_experts({k: v for k, v in weights.items()
                             if not layout.is_mtp(k, cfg) and not layout.is_recomputed(k)}, cfg)
        for i in range(cfg.num_hidden_layers):
            attn = f"model.layers.{i}.self_attn"
            embed_q, unembed_out = layout.split_kv_b_names(attn)
            for part in layout.QUANT_PARTS:
                if layout.kv_b_name(attn, part) in out:
                    w_uk_rows, w_uv = layout.split_kv_b(out.pop(layout.kv_b_name(attn, part)), cfg)
                    out[f"{embed_q}.{part}"] = mx.contiguous(w_uk_rows)
                    out[f"{unembed_out}.{part}"] = mx.contiguous(w_uv)
        return out


def stack_experts(weights: dict[str, mx.array], cfg: ModelConfig) -> dict[str, mx.array]:
    """Per-expert tensors (Hugging Face naming) stacked into each MoE layer's switch_mlp [E, ...];
    every family's sanitize starts here."""
    for i in cfg.moe_layers:
        for proj in layout.EXPERT_PROJS:
            for part in layout.QUANT_PARTS:
                names = [layout.expert_name(i, e, proj, part) for e in range(cfg.n_routed_experts)]
                if names[0] in weights:
                    missing = [n for n in names if n not in weights]
                    if missing:
                        raise EdgeDSError(f"tensor '{missing[0]}' is missing from the checkpoint")
                    weights[layout.stacked_name(i, proj, part)] = mx.stack([weights.pop(n) for n in names])
    return weights


def build(cfg: ModelConfig, names) -> Model:
    """The model, holding W_UK the way the checkpoint stores it (layout.kv_b_as_rows)."""
    return Model(cfg, kv_b_rows=layout.kv_b_as_rows(names))


def causal_mask(L: int, offset: int, dtype: mx.Dtype) -> mx.array:
    """Additive mask [L, offset + L]: query i (at position offset + i) sees keys <= offset + i."""
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset + L)[None]
    return mx.where(k <= q, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
