"""DeepSeek-V4 (deepseek_v4): shared-KV MQA over a sliding window plus compressed entries,
manifold-constrained hyper-connections, hash and top-k routed MoE.

Checked against transformers' DeepseekV4ForCausalLM (tests/test_v4.py); names follow its
state dict, with routed experts stacked as switch_mlp like every other family here.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import layout
from ..cache import PromptCache
from ..config import DeepseekV4Config
from .compressor import Compressor, V4LayerCache
from .deepseek import stack_experts
from .layers import ExpertLinear, Linear, matmul
from .moe import MLP, MoE, SwitchGLU
from .rope import TailRoPE


def mm(a: mx.array, b: mx.array) -> mx.array:
    """a @ b through layers.matmul: numpy's BLAS for a large product on a CPU without a fast one
    (MLX's reference BLAS is 3-5x slower even on a decode step's [16 heads, 1, 128] x [128, 640]
    attention; the sync it costs is smaller)."""
    return matmul(a, b)


def rms(x: mx.array, eps: float) -> mx.array:
    """RMS normalisation without a weight, in float32: x [..., d]."""
    x = x.astype(mx.float32)
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)


class Attention(nn.Module):
    """x [B, L, D] -> [B, L, D]. 64-wide heads of one shared key = value row per token (MQA),
    roped at the end of each row; each query attends to its sliding window and, in CSA/HCA
    layers, to the compressed entries it may see; a per-head sink takes part of the softmax;
    the output is un-roped, then projected per head group (o_a_proj) and mixed (o_b_proj)."""

    def __init__(self, cfg: DeepseekV4Config, i: int):
        super().__init__()
        H, hd, G = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.H, self.hd, self.G = H, hd, G
        self.window, self.eps, self.scale = cfg.sliding_window, cfg.rms_norm_eps, cfg.softmax_scale
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * hd, bias=False)
        self.kv_proj = Linear(cfg.hidden_size, hd, bias=False)
        self.kv_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
        self.o_a_proj = ExpertLinear(H * hd // G, cfg.o_lora_rank, G)  # group g is "expert" g
        self.o_b_proj = Linear(G * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = mx.zeros((H,))
        # Sliding layers use the main RoPE; compressed layers (and their compressors) the compress one.
        if cfg.compress_rate(i):
            self.rope = TailRoPE(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.compress_rope_scaling,
                                 cfg.max_position_embeddings)
            self.compressor = Compressor(cfg, i, self.rope)
        else:
            self.rope = TailRoPE(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def __call__(self, x: mx.array, cache: V4LayerCache) -> mx.array:
        B, L, _ = x.shape
        positions = mx.arange(cache.offset, cache.offset + L)  # [L]
        q_latent = self.q_a_norm(self.q_a_proj(x))  # [B, L, q_lora]
        q = self.q_b_proj(q_latent).reshape(B, L, self.H, self.hd)
        q = self.rope(rms(q, self.eps).astype(x.dtype).swapaxes(1, 2), positions)  # [B, H, L, hd]
        kv = self.rope(self.kv_norm(self.kv_proj(x))[:, None], positions)  # [B, 1, L, hd]

        rows = cache.update_window(kv)  # [B, 1, S, hd]: window rows then these L
        S = rows.shape[2]
        key_pos = mx.arange(cache.offset + L - S, cache.offset + L)
        near = (key_pos[None] <= positions[:, None]) & (key_pos[None] > positions[:, None] - self.window)
        mask = mx.where(near, 0.0, -mx.inf)[None, None]  # [1, 1, L, S]
        if "compressor" in self:
            entries, seen = self.compressor(x, q_latent, positions, cache)
            if entries is not None:
                if isinstance(seen, tuple):  # decode in CSA: only the chosen entries
                    chosen, ok = seen  # [B, 1, k]
                    entries = mx.take_along_axis(entries, chosen[:, :, :, None], axis=2)  # [B, 1, k, hd]
                    seen = mx.where(ok, 0.0, -mx.inf)
                rows = mx.concatenate([rows, entries.astype(rows.dtype)], axis=2)
                seen = mx.broadcast_to(seen, (B, *seen.shape[1:]))  # HCA's [1, L, T] serves every sequence
                mask = mx.concatenate([mx.broadcast_to(mask, (B, 1, L, S)), seen[:, None]], axis=-1)
        cache.advance(L)

        scores = mm(q, rows.swapaxes(-1, -2)).astype(mx.float32) * self.scale + mask  # [B, H, L, S']
        sinks = mx.broadcast_to(self.sinks.astype(mx.float32)[None, :, None, None], (B, self.H, L, 1))
        probs = mx.softmax(mx.concatenate([scores, sinks], axis=-1), axis=-1, precise=True)[..., :-1]
        out = mm(probs.astype(rows.dtype), rows)  # [B, H, L, hd]
        out = self.rope(out, positions, inverse=True)  # values carried their keys' rotation
        groups = out.swapaxes(1, 2).reshape(B * L, self.G, -1).swapaxes(0, 1)  # [G, B*L, H*hd/G]
        y = self.o_a_proj.each_expert(groups).swapaxes(0, 1).reshape(B, L, -1)  # [B, L, G*o_lora]
        return self.o_b_proj(y)


class HyperConnection(nn.Module):
    """mHC: the residual is hc_mult streams h [B, L, n, D]. From them it computes the block's input
    (their `pre`-weighted sum, [B, L, D]), `post` [B, L, n] to spread the block's output over the
    streams, and `comb` [B, L, n, n], doubly stochastic (Sinkhorn), to mix the streams."""

    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        n = cfg.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = mx.zeros(((2 + n) * n, n * cfg.hidden_size))
        self.base = mx.zeros(((2 + n) * n,))
        self.scale = mx.ones((3,))

    def __call__(self, h: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, n, D = h.shape
        mixes = mm(rms(h.reshape(B, L, n * D), self.norm_eps), self.fn.astype(mx.float32).T)  # [B, L, (2+n)n]
        base, scale = self.base.astype(mx.float32), self.scale.astype(mx.float32)
        pre = mx.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.eps
        post = 2 * mx.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = mixes[..., 2 * n:].reshape(B, L, n, n) * scale[2] + base[2 * n:].reshape(n, n)
        comb = mx.softmax(comb, axis=-1, precise=True) + self.eps
        comb = comb / (comb.sum(axis=-2, keepdims=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(axis=-1, keepdims=True) + self.eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + self.eps)
        collapsed = (pre[..., None] * h).sum(axis=2).astype(h.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(h: mx.array, out: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """The streams after a block: post spreads its output out [B, L, D], comb^T mixes h [B, L, n, D]."""
        return (post[..., None] * out[:, :, None].astype(mx.float32)
                + comb.swapaxes(-1, -2) @ h.astype(mx.float32)).astype(h.dtype)


class HyperHead(nn.Module):
    """The final collapse of the streams: h [B, L, n, D] -> [B, L, D]."""

    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        n = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = mx.zeros((n, n * cfg.hidden_size))
        self.hc_base = mx.zeros((n,))
        self.hc_scale = mx.ones((1,))

    def __call__(self, h: mx.array) -> mx.array:
        B, L, n, D = h.shape
        mixes = mm(rms(h.reshape(B, L, n * D), self.norm_eps), self.hc_fn.astype(mx.float32).T)  # [B, L, n]
        pre = mx.sigmoid(mixes * self.hc_scale.astype(mx.float32) + self.hc_base.astype(mx.float32)) + self.eps
        return (pre[..., None] * h).sum(axis=2).astype(h.dtype)


class Router(nn.Module):
    """x [N, D] -> (indices [N, k], weights [N, k]). Scores are sqrt(softplus) (or softmax, sigmoid)
    of the logits; a top-k layer chooses by score + e_score_correction_bias, a hash layer takes the
    token's row of tid2eid (set `tokens` first). Weights: the chosen scores (normalised to sum 1
    unless they are softmax scores, as DeepSeek's gate does), times routed_scaling_factor."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool):
        super().__init__()
        self.top_k, self.scoring, self.scaling = cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = mx.zeros((cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.tid2eid = mx.zeros((cfg.vocab_size, cfg.num_experts_per_tok), mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((cfg.n_routed_experts,))
        self.set_tokens(None)

    def set_tokens(self, tokens: mx.array | None) -> None:
        """The token ids [N] of the next call (hash routing reads them); not a parameter."""
        object.__setattr__(self, "tokens", tokens)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = mm(x.astype(mx.float32), self.weight.astype(mx.float32).T)  # [N, E]
        if self.scoring == "sqrtsoftplus":
            scores = mx.sqrt(nn.softplus(logits))
        elif self.scoring == "sigmoid":
            scores = mx.sigmoid(logits)
        else:
            scores = mx.softmax(logits, axis=-1, precise=True)
        if "tid2eid" in self:
            indices = self.tid2eid[self.tokens].astype(mx.uint32)
        else:
            choice = scores + self.e_score_correction_bias.astype(mx.float32)
            indices = mx.argpartition(-choice, kth=self.top_k - 1, axis=-1)[:, : self.top_k]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.scoring != "softmax":  # DeepSeek's gate renormalises all but softmax scores
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.scaling


class V4MoE(MoE):
    """models.moe.MoE with V4's router and swiglu_limit: x [B, L, D] -> [B, L, D]."""

    def __init__(self, cfg: DeepseekV4Config, i: int):
        nn.Module.__init__(self)
        self.gate = Router(cfg, cfg.is_hash_layer(i))
        self.n_shared_experts = 1
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                                    cfg.swiglu_limit)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)


class DecoderLayer(nn.Module):
    """h [B, L, n, D] -> [B, L, n, D]: attention, then MoE, each read from and written to the
    streams through its hyper-connection."""

    def __init__(self, cfg: DeepseekV4Config, i: int):
        super().__init__()
        self.self_attn = Attention(cfg, i)
        self.mlp = V4MoE(cfg, i)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def __call__(self, h: mx.array, cache: V4LayerCache) -> mx.array:
        post, comb, x = self.attn_hc(h)
        h = HyperConnection.merge(h, self.self_attn(self.input_layernorm(x), cache), post, comb)
        post, comb, x = self.ffn_hc(h)
        return HyperConnection.merge(h, self.mlp(self.post_attention_layernorm(x)), post, comb)


class DeepseekV4Model(nn.Module):
    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)


class Model(nn.Module):
    """token ids [B, L] -> logits [B, L, vocab]; `cache` is a PromptCache of V4LayerCaches (one is
    made for the call when none is given)."""

    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV4Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dtype = mx.float32

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> PromptCache:
        cfg = self.config

        def pools(i: int) -> tuple[str, ...]:
            return () if not cfg.compress_rate(i) else ("compressor", "indexer") if cfg.layer_types[i] == "compressed_sparse_attention" else ("compressor",)

        layers = iter(range(cfg.num_hidden_layers))
        return PromptCache(cfg.num_hidden_layers, lambda: V4LayerCache(cfg.sliding_window, pools(next(layers))))

    def __call__(self, tokens: mx.array, cache: PromptCache | None = None, last_only: bool = False) -> mx.array:
        """last_only: logits of the last position only, [B, 1, vocab]."""
        cache = cache if cache is not None else self.make_cache()
        flat = tokens.reshape(-1)
        for layer in self.layers:
            layer.mlp.gate.set_tokens(flat)
        x = self.model.embed_tokens(tokens).astype(self.dtype)  # [B, L, D]
        h = mx.broadcast_to(x[:, :, None], (*x.shape[:2], self.config.hc_mult, x.shape[-1]))  # [B, L, n, D]
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        x = self.model.norm(self.model.hc_head(h[:, -1:] if last_only else h))
        if "lm_head" in self:
            return self.lm_head(x)
        return self.model.embed_tokens.as_linear(x)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names -> module names: MTP dropped, routed experts stacked into switch_mlp
        (per-expert tensors, or transformers' fused gate_up_proj/down_proj), o_a_proj's rows split
        into its groups [G, o_lora, in]."""
        cfg = self.config
        out = stack_experts({k: v for k, v in weights.items()
                             if not layout.is_mtp(k, cfg) and not layout.is_recomputed(k)}, cfg)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            fused = f"{p}.mlp.experts.gate_up_proj"
            if fused in out:  # transformers' own save: [E, 2I, D], gate rows then up rows
                gate_up = out.pop(fused)
                I = gate_up.shape[1] // 2
                out[layout.stacked_name(i, "gate_proj")] = gate_up[:, :I]
                out[layout.stacked_name(i, "up_proj")] = gate_up[:, I:]
                out[layout.stacked_name(i, "down_proj")] = out.pop(f"{p}.mlp.experts.down_proj")
            a = f"{p}.self_attn"
            for part in layout.QUANT_PARTS:
                name = f"{a}.o_a_proj.{part}"
                if name in out:
                    out[name] = out[name].reshape(cfg.o_groups, -1, out[name].shape[-1])
        return out


def build(cfg: DeepseekV4Config, names) -> Model:
    return Model(cfg)
