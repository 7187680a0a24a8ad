"""The DeepSeek decoder (deepseek_v2, deepseek_v3, kimi_k2): MLA + dense/MoE feed-forward."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .layers import HeadLinear, Linear
from .mla import MLA
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class Model(nn.Module):
    """token ids [B, L] -> logits [B, L, vocab]; `cache` is a list of per-layer LatentCaches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dtype = mx.float32

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def __call__(self, tokens: mx.array, cache: list | None = None, mask: mx.array | None = None) -> mx.array:
        h = self.model.embed_tokens(tokens).astype(self.dtype)  # [B, L, D]
        L = h.shape[1]
        offset = cache[0].offset if cache else 0
        if mask is None and L > 1:
            mask = causal_mask(L, offset, self.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None)
        h = self.model.norm(h)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names (HF or mlx-lm layout) -> this module's parameter names."""
        cfg = self.config
        n = cfg.num_hidden_layers
        mtp = re.compile(rf"^model\.layers\.(\d+)\.")
        out = {}
        for k, v in weights.items():
            m = mtp.match(k)
            if (m and int(m.group(1)) >= n) or "rotary_emb.inv_freq" in k:
                continue  # the MTP module is not part of the forward pass
            out[k] = v
        for i in range(n):
            p = f"model.layers.{i}"
            # HF per-expert tensors -> stacked switch_mlp
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for kind in ("weight", "scales", "biases"):
                    first = f"{p}.mlp.experts.0.{proj}.{kind}"
                    if first in out:
                        out[f"{p}.mlp.switch_mlp.{proj}.{kind}"] = mx.stack(
                            [out.pop(f"{p}.mlp.experts.{e}.{proj}.{kind}") for e in range(cfg.n_routed_experts)])
            # kv_b_proj [H*(nope+v), kv_lora] -> per-head W_UK [H, nope, kv_lora] and W_UV [H, v, kv_lora].
            # Slicing rows keeps a quantized kv_b_proj exact (groups run along kv_lora).
            a = f"{p}.self_attn"
            if f"{a}.kv_b_proj.weight" in out:
                H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
                for kind in ("weight", "scales", "biases"):
                    key = f"{a}.kv_b_proj.{kind}"
                    if key in out:
                        w = out.pop(key)
                        w = w.reshape(H, nope + cfg.v_head_dim, w.shape[-1])
                        out[f"{a}.embed_q.{kind}"] = mx.contiguous(w[:, :nope])
                        out[f"{a}.unembed_out.{kind}"] = mx.contiguous(w[:, nope:])
                attn = self.layers[i].self_attn
                attn.embed_q = HeadLinear(cfg.kv_lora_rank, nope, H)  # weight [H, nope, kv_lora]
                attn.embed_q_latent_last = True
        return out


def causal_mask(L: int, offset: int, dtype: mx.Dtype) -> mx.array:
    """Additive mask [L, offset + L]: query i (at position offset + i) sees keys <= offset + i."""
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset + L)[None]
    return mx.where(k <= q, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
