"""Tiny DeepSeek checkpoints made at test time with transformers (the parity oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

V3 = dict(  # q_lora, sigmoid + correction bias, n_group > 1, YaRN
    model_type="deepseek_v3", vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
    num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, routed_scaling_factor=2.5, norm_topk_prob=True,
    topk_method="noaux_tc", scoring_func="sigmoid", max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)
V2_LITE = dict(  # plain q_proj, softmax greedy, norm_topk_prob false, YaRN with mscale 0.707
    model_type="deepseek_v2", vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
    num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.0, norm_topk_prob=False,
    topk_method="greedy", scoring_func="softmax", max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)
MOONLIGHT = dict(V3, n_group=1, topk_group=1, rms_norm_eps=1e-5, rope_theta=50000.0, rope_scaling=None)
V2_GROUPED = dict(V2_LITE, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
                  routed_scaling_factor=1.5)
# DeepSeek-V3.2: V3 plus a Lightning Indexer per layer. Two shapes: YaRN with 8 index heads, and
# plain RoPE with 6 wider heads and a larger topk.
V32 = dict(V3, model_type="deepseek_v32", index_topk=8, index_n_heads=8, index_head_dim=32)
V32_WIDE = dict(V3, model_type="deepseek_v32", index_topk=12, index_n_heads=6, index_head_dim=48, rope_scaling=None)
STYLES = {"v3": V3, "v2lite": V2_LITE, "moonlight": MOONLIGHT, "v2grouped": V2_GROUPED, "v32": V32,
          "v32wide": V32_WIDE}


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model of the given style (float32, eval mode)."""
    import torch
    import transformers

    cfg = dict(STYLES[kind], **overrides)
    torch.manual_seed(seed)
    if cfg["model_type"] == "deepseek_v2":
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg))
    elif cfg["model_type"] == "deepseek_v32":
        model = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**cfg))
    else:
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg))
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Trained-model-like spread so routing and attention are not degenerate.
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.rand_like(p) * 0.1 - 0.05)
            elif p.dim() == 2 or "experts" in name:
                p.normal_(0, 0.08)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.float().eval()


def condition(model):
    """Rescales a tiny model to behave more like a trained one: unit-RMS embeddings carry the
    residual stream, o_proj/down_proj add small updates, a larger lm_head peaks the outputs.
    The default init is chaotic, so any weight noise (4-bit, FP8) scrambles its flat logits
    and "close to the float model" would mean nothing."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.mul_(1.0 / 0.08)
            elif "o_proj" in name or "down_proj" in name:
                p.mul_(0.3)
            elif name.startswith("lm_head"):
                p.mul_(3.0)
    return model


def save_hf(model, path: Path, dtype=None) -> Path:
    """save_pretrained (per-expert names) and a minimal tokenizer-free dir."""
    import torch

    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    # Legacy configs name the field rope_scaling; keep the checkpoint like real ones on the hub.
    cfg = json.loads((path / "config.json").read_text())
    return path


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
