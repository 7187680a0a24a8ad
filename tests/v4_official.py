"""Tiny DeepSeek-V4 checkpoints in DeepSeek's official release layout, written at test time.

A random transformers DeepseekV4ForCausalLM is stored as the release stores V4-Flash (facts from
../shared/reference/deepseek-v32-v4.md): unprefixed official names, dense weights F8_E4M3 with an
F8_E8M0 `.scale` per 128x128 block (ragged edge blocks included), routed experts packed FP4
(E2M1, two per I8 byte, low nibble first) with one F8_E8M0 scale per 32 inputs, or, for the
Base release, FP8 blocks like the dense weights. The model's weights are then replaced by the
values the checkpoint decodes to, so the transformers model is the oracle of the converted one.

Every format fact here is written from its definition (E2M1 and E4M3 bit fields, E8M0 = 2^(code-127)),
independently of converters/official_v4.py, which the tests check against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
# hidden 64; head_dim 48 so q_b_proj has 192 rows (a 128-row block and a ragged 64-row one),
# o_groups 1 so o_a_proj has 192 input columns (a ragged column block), vocab 160 (ragged head rows).
V4_TINY = dict(
    vocab_size=160, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
    head_dim=48, q_lora_rank=48, partial_rotary_factor=0.25, num_experts_per_tok=2, n_routed_experts=4,
    layer_types=[SWA, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 8}, hc_mult=2, o_groups=1, o_lora_rank=16,
    index_n_heads=2, index_head_dim=16, index_topk=64, sliding_window=8,
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    max_position_embeddings=512, num_nextn_predict_layers=1, routed_scaling_factor=1.5, swiglu_limit=10.0,
)

# Official leaf (after `layers.{i}.`) for transformers' module leaf (after `model.layers.{i}.`):
# DeepSeek's names from the reference, checked against transformers' own renames by the tests.
LEAF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{b}_hc.{p}": f"hc_{b}_{p}" for b in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "self_attn.sinks": "attn.attn_sink", "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight", "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight", "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight", "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    **{f"mlp.shared_experts.{p}.weight": f"ffn.shared_experts.{w}.weight"
       for p, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))},
}
TOP = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "model.norm.weight": "norm.weight",
       **{f"model.hc_head.hc_{p}": f"hc_head_{p}" for p in ("fn", "base", "scale")}}
EXPERT_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def official_name(hf: str) -> str:
    """transformers' state-dict name (experts per expert) -> DeepSeek's release name."""
    if hf in TOP:
        return TOP[hf]
    parts = hf.split(".")
    i, leaf = parts[2], ".".join(parts[3:])
    if leaf.startswith("mlp.experts."):
        _, _, e, proj, _ = leaf.split(".")
        return f"layers.{i}.ffn.experts.{e}.{EXPERT_W[proj]}.weight"
    return f"layers.{i}.{LEAF[leaf]}"


# --- formats, from their definitions -------------------------------------------------------------
def e2m1_value(code: int) -> float:
    """E2M1: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    return sign * (man / 2 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


E2M1 = np.array([e2m1_value(c) for c in range(16)], np.float32)


def e8m0(codes: np.ndarray) -> np.ndarray:
    return np.exp2(codes.astype(np.float64) - 127).astype(np.float32)


def fp4_encode(w: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, cols] -> (packed int8 [rows, cols/2], E8M0 codes uint8 [rows, cols/32]), the
    scale 2^ceil(log2(amax/6)) of each 32-group (some groups end up with |code| < 4 at the top,
    which is where re-quantizing would pick another scale), nearest E2M1 code per value, and a
    few negative zeros."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // 32, 32)
    amax = np.abs(g).max(-1)
    codes_s = (np.ceil(np.log2(np.maximum(amax, 1e-30) / 6)) + 127).astype(np.int64)
    codes_s = np.clip(codes_s, 1, 254).astype(np.uint8)
    x = g / e8m0(codes_s)[..., None]
    codes = np.abs(x[..., None] - E2M1).argmin(-1).astype(np.uint8).reshape(rows, cols)
    codes[rng.random(codes.shape) < 0.02] = 8  # -0
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), codes_s


def fp4_decode(packed: np.ndarray, scale_codes: np.ndarray) -> np.ndarray:
    b = packed.view(np.uint8)
    codes = np.empty((b.shape[0], b.shape[1] * 2), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = b & 0xF, b >> 4
    v = E2M1[codes].reshape(b.shape[0], -1, 32) * e8m0(scale_codes)[..., None]
    return v.reshape(b.shape[0], -1).astype(np.float32)


def fp8_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, cols] -> (float8_e4m3fn, E8M0 codes [ceil(rows/128), ceil(cols/128)]) with a
    power-of-two scale 2^ceil(log2(amax/448)) per 128x128 block (DeepSeek's ue8m0 scales)."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    codes = np.zeros((br, bc), np.uint8)
    q = np.zeros_like(w)
    for i in range(br):
        for j in range(bc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            c = int(np.ceil(np.log2(max(float(np.abs(blk).max()), 1e-30) / 448))) + 127
            codes[i, j] = c
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk / e8m0(np.array(c))
    return q.astype(ml_dtypes.float8_e4m3fn), codes


def fp8_decode(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The loop definition: w[i, j] = q[i, j] * 2^(code[i // 128, j // 128] - 127)."""
    s = e8m0(codes)
    rows, cols = q.shape
    return q.astype(np.float32) * s[np.arange(rows)[:, None] // 128, np.arange(cols)[None, :] // 128]


# --- the tiny model and its official checkpoint ----------------------------------------------------
def make_v4_model(seed: int = 0, **overrides):
    """A random transformers DeepseekV4ForCausalLM (float32, eager, eval) with trained-like spreads
    and a hash table of distinct experts per token."""
    import torch
    import transformers

    cfg = transformers.DeepseekV4Config(**dict(V4_TINY, **overrides))
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.1 - 0.05)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 or "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
                b.copy_(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.1 - 0.05)
    return model.float().eval()


def per_expert_state(model) -> dict[str, np.ndarray]:
    """The model's state dict as numpy, routed experts split per expert (gate_up_proj = gate rows, then up)."""
    out = {}
    for k, v in model.state_dict().items():
        a = v.detach().numpy()
        if k.endswith("mlp.experts.gate_up_proj"):
            base, I = k.removesuffix("gate_up_proj"), a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = a[e, :I], a[e, I:]
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(a.shape[0]):
                out[f"{k.removesuffix('down_proj')}{e}.down_proj.weight"] = a[e]
        else:
            out[k] = a
    return out


def load_per_expert(model, state: dict[str, np.ndarray]) -> None:
    """Inverse of per_expert_state: writes `state` into the model (experts fused back)."""
    import torch

    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k.removesuffix("gate_up_proj")
            new[k] = torch.tensor(np.stack([
                np.concatenate([state[f"{base}{e}.gate_proj.weight"], state[f"{base}{e}.up_proj.weight"]])
                for e in range(v.shape[0])]))
        elif k.endswith("mlp.experts.down_proj"):
            base = k.removesuffix("down_proj")
            new[k] = torch.tensor(np.stack([state[f"{base}{e}.down_proj.weight"] for e in range(v.shape[0])]))
        else:
            new[k] = torch.tensor(state[k]).to(v.dtype)
    model.load_state_dict(new)


def _kind(hf: str, a: np.ndarray) -> str:
    """How the release stores a tensor: fp4/fp8 experts, fp8 dense linears, bf16, f32 or int."""
    if ".mlp.experts." in hf:
        return "expert"
    if a.dtype.kind == "i":
        return "int"
    if hf.endswith((".fn", ".base", ".scale", ".sinks", ".position_bias", "hc_fn", "hc_base", "hc_scale",
                    "e_score_correction_bias")):
        return "f32"
    if a.ndim == 2 and hf.endswith(".weight") and not hf.endswith(("embed_tokens.weight", "mlp.gate.weight")):
        return "fp8"
    return "bf16"


def write_official(model, path: Path, expert_dtype: str = "fp4", seed: int = 0,
                   mtp: bool = True) -> dict[str, np.ndarray]:
    """Writes `model` into `path` in the official layout (one shard, plus its index and an
    official-style config.json), replaces the model's weights by what the checkpoint decodes to,
    and returns that decoded state (transformers' names, experts per expert) and the raw tensors
    under "raw:<official name>"."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    state = per_expert_state(model)
    tensors: dict[str, torch.Tensor] = {}
    decoded: dict[str, np.ndarray] = {}
    for hf, a in state.items():
        name, kind = official_name(hf), _kind(hf, a)
        if kind == "expert":
            kind = "fp4" if expert_dtype == "fp4" else "fp8"
        scale = name.removesuffix(".weight") + ".scale"
        if kind == "fp4":
            packed, codes = fp4_encode(a, rng)
            tensors[name], tensors[scale] = torch.from_numpy(packed), torch.from_numpy(codes).view(torch.float8_e8m0fnu)
            decoded[hf] = fp4_decode(packed, codes)
        elif kind == "fp8":
            q, codes = fp8_encode(a)
            tensors[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            tensors[scale] = torch.from_numpy(codes).view(torch.float8_e8m0fnu)
            decoded[hf] = fp8_decode(q, codes)
        elif kind == "int":
            tensors[name] = torch.from_numpy(a.astype(np.int32))
            decoded[hf] = a
        elif kind == "bf16":
            t = torch.from_numpy(a).to(torch.bfloat16)
            tensors[name], decoded[hf] = t, t.float().numpy()
        else:
            tensors[name], decoded[hf] = torch.from_numpy(a.astype(np.float32)), a.astype(np.float32)
    if mtp:  # a stand-in MTP module in the release's dtypes: kept byte for byte, never loaded
        packed, codes = fp4_encode(rng.normal(0, 0.1, (32, 64)).astype(np.float32), rng)
        q, qc = fp8_encode(rng.normal(0, 0.1, (48, 64)).astype(np.float32))
        tensors.update({"mtp.0.ffn.experts.0.w1.weight": torch.from_numpy(packed),
                        "mtp.0.ffn.experts.0.w1.scale": torch.from_numpy(codes).view(torch.float8_e8m0fnu),
                        "mtp.0.attn.wq_a.weight": torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn),
                        "mtp.0.attn.wq_a.scale": torch.from_numpy(qc).view(torch.float8_e8m0fnu),
                        "mtp.0.enorm.weight": torch.ones(64, dtype=torch.bfloat16)})
    names = sorted(tensors)
    half = len(names) // 2  # two shards and an index, like the release
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, ns in shards.items():
        save_file({n: tensors[n].contiguous() for n in ns}, str(path / fname))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    (path / "config.json").write_text(json.dumps(official_config(model.config, expert_dtype), indent=2))
    load_per_expert(model, decoded)
    return decoded


def official_config(cfg, expert_dtype: str) -> dict:
    """config.json as the release writes it: legacy spellings (compress_ratios, num_hash_layers,
    qk_rope_head_dim), expert_dtype and the FP8 quantization_config."""
    rate = {SWA: 0, **cfg.compress_rates}
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": 1, "head_dim": cfg.head_dim, "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": 1,
        "num_experts_per_tok": cfg.num_experts_per_tok, "scoring_func": cfg.scoring_func, "norm_topk_prob": True,
        "routed_scaling_factor": cfg.routed_scaling_factor, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_parameters["main"]["rope_theta"],
        "compress_rope_theta": cfg.rope_parameters["compress"]["rope_theta"],
        "max_position_embeddings": cfg.max_position_embeddings,
        "compress_ratios": [rate[t] for t in cfg.layer_types] + [0],  # the MTP layer's entry too
        "compress_rate_csa": cfg.compress_rates[CSA], "compress_rate_hca": cfg.compress_rates[HCA],
        "num_hash_layers": cfg.mlp_layer_types.count("hash_moe"),
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "swiglu_limit": cfg.swiglu_limit, "sliding_window": cfg.sliding_window, "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank, "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", "expert_dtype": expert_dtype,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }
