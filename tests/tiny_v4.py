"""Tiny DeepSeek-V4 checkpoints made at test time with transformers' DeepseekV4ForCausalLM (the oracle),
saved in the Hugging Face layout edge-ds reads (transformers' module names, one tensor per routed
expert). tests/v4_official.py writes the official release layout instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
# Two shapes that differ in everything the issue names: layer order, compression rates, hc_mult,
# hash layers, o_groups (and RoPE). 16 indexer heads: a query's index score is exactly 0 only when
# all 16 ReLUs are, so exact ties at the top-k boundary (which any two top-k kernels may break
# differently) are rare; the tests still find and report them.
V4_A = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32, q_lora_rank=16,
    moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, sliding_window=8, o_groups=2,
    o_lora_rank=16, index_n_heads=16, index_head_dim=16, index_topk=3, partial_rotary_factor=0.25,
    layer_types=[SWA, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 8}, num_hash_layers=1, hc_mult=4,
    rope_parameters={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64},
    max_position_embeddings=256, swiglu_limit=1.0,
)
V4_B = dict(
    V4_A, layer_types=[CSA, HCA, SWA, CSA, HCA], num_hidden_layers=5, compress_rates={CSA: 2, HCA: 16},
    num_hash_layers=2, hc_mult=2, o_groups=4, index_topk=5, sliding_window=6, scoring_func="sqrtsoftplus",
    rope_parameters=None, routed_scaling_factor=2.0,
)
STYLES = {"a": V4_A, "b": V4_B}


def make_v4(kind: str, seed: int = 0, **overrides):
    """A random transformers DeepseekV4ForCausalLM (float32, eval, eager attention). Parameters the
    default init leaves at zero or one (sinks, pooling biases, mHC bases and scales, the correction
    bias, tid2eid) are randomised too, so every path is exercised."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = dict(STYLES[kind], **overrides)
    torch.manual_seed(seed)
    config = DeepseekV4Config(**{k: v for k, v in cfg.items() if v is not None})
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("position_bias", "sinks", ".base", "hc_base")):
                p.normal_(0, 0.5)
            elif name.endswith((".scale", "hc_scale")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1.0)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
            elif "tid2eid" in name:
                b.copy_(torch.stack([torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok]
                                     for _ in range(config.vocab_size)]))
    return model


def hf_state(model) -> dict:
    """The model's tensors in the HF layout edge-ds reads: fused experts split per expert."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :inter]
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, inter:]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[k] = v
    return {k: v.contiguous() for k, v in out.items()}


def save_v4(model, path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(hf_state(model), str(path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("_attn_implementation_autoset", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
