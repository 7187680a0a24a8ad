"""Checkpoint layout: what each file and tensor name of a model directory means.

The one owner of checkpoint naming. Loading, lazy experts, `info` and both converters ask
here; a new family adds its patterns here and in its own model file.

Two layouts of the same DeepSeek tensors (safetensors, `model.layers.{i}.` prefixes):
- Hugging Face / DeepSeek: one tensor per routed expert (`mlp.experts.{e}.{proj}.weight`),
  `self_attn.kv_b_proj.weight` [H * (nope + v), kv_lora], FP8 weights beside a
  `weight_scale_inv` of 128x128 block scales.
- mlx-lm (what `edge-ds convert` writes): routed experts stacked per layer
  (`mlp.switch_mlp.{proj}.{part}`, [E, ...]), quantized weights as weight/scales/biases with a
  `quantization` block in config.json, and for deepseek_v3/kimi_k2 kv_b_proj split into
  `embed_q` [H, kv_lora, nope] (W_UK transposed) and `unembed_out` [H, v, kv_lora] (W_UV).
  mlx-lm keeps deepseek_v2's kv_b_proj as it is.
Layers numbered num_hidden_layers and up are the multi-token-prediction (MTP) module, which
the forward pass does not use.

Nothing here imports MLX: arrays are numpy or MLX alike (only reshape, slicing, transpose).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .config import CSA, DeepseekV4Config, ModelConfig

# --- files of a model directory -----------------------------------------------------------
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints: tensor name -> shard file
WEIGHTS_GLOB = "model*.safetensors"  # the main model's shards when there is no index
MTP_FILE = "mtp.safetensors"  # the converter's home for the MTP module (mlx-lm never reads it)
ONNX_MANIFEST = "onnx.json"  # written by `edge-ds export-onnx`, read by the onnx backend



def has_weights(directory: Path) -> bool:
    """Whether a model directory holds safetensors weights of the main model."""
    return (directory / INDEX_FILE).is_file() or any(directory.glob(WEIGHTS_GLOB))


# --- tensor names ---------------------------------------------------------------------------
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
QUANT_PARTS = ("weight", "scales", "biases")  # mlx-lm's quantized tensor; float weights have only `weight`
FP8_SCALE_SUFFIX = "_scale_inv"  # `<name>_scale_inv` beside an FP8 `<name>`

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None for the embedding, final norm and head)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def is_mtp(name: str, cfg: ModelConfig) -> bool:
    """Whether a tensor belongs to the MTP module (layers past num_hidden_layers)."""
    layer = layer_of(name)
    return layer is not None and layer >= cfg.num_hidden_layers


def is_recomputed(name: str) -> bool:
    """Tensors some checkpoints carry that edge-ds recomputes instead (RoPE's inverse frequencies)."""
    return "rotary_emb.inv_freq" in name


# Kept in float32 whatever the compute dtype, as DeepSeek keeps them: the router's correction bias
# (the expert choice), and DeepSeek-V4's attention sinks, pooling biases and hyper-connections.
_FLOAT32 = re.compile(r"(e_score_correction_bias|\.sinks|\.position_bias|_hc\.(fn|base|scale)|hc_head\.hc_\w+)$")


def keeps_float32(name: str) -> bool:
    return _FLOAT32.search(name) is not None


def is_fp8_scale(name: str) -> bool:
    return name.endswith(FP8_SCALE_SUFFIX)


def fp8_scale_of(name: str) -> str:
    """The block-scale tensor of FP8 weight `name`."""
    return name + FP8_SCALE_SUFFIX


def is_routed_expert(name: str) -> bool:
    """Whether a tensor belongs to a routed expert (stacked or per-expert naming)."""
    return ".mlp.switch_mlp." in name or ".mlp.experts." in name


def expert_name(layer: int, expert: int, proj: str, part: str = "weight") -> str:
    """Hugging Face naming: one tensor per expert."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.{part}"


def stacked_name(layer: int, proj: str, part: str = "weight") -> str:
    """mlx-lm naming: all experts of a layer in one [E, ...] tensor."""
    return f"model.layers.{layer}.mlp.switch_mlp.{proj}.{part}"


def parse_expert(name: str) -> tuple[int, int, str, str] | None:
    """(layer, expert, proj, part) of a per-expert tensor name, else None."""
    m = _EXPERT.match(name)
    return (int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)) if m else None


def stacked_of(name: str) -> str | None:
    """The stacked name a per-expert tensor joins (None if `name` is not per-expert)."""
    parsed = parse_expert(name)
    return None if parsed is None else stacked_name(parsed[0], parsed[2], parsed[3])


# --- MLA's kv_b_proj ---------------------------------------------------------------------
# kv_b_proj's rows are, per head, nope rows of W_UK then v rows of W_UV, each kv_lora wide.
# Splitting rows keeps a quantized kv_b_proj exact (its groups run along kv_lora).
def kv_b_name(attn: str, part: str = "weight") -> str:
    return f"{attn}.kv_b_proj.{part}"


def split_kv_b(w: Any, cfg: ModelConfig) -> tuple[Any, Any]:
    """kv_b_proj [H * (nope + v), cols] -> (W_UK rows [H, nope, cols], W_UV [H, v, cols]);
    cols is kv_lora for a float weight, or the packed/group columns of its quantized parts."""
    nope = cfg.qk_nope_head_dim
    w = w.reshape(cfg.num_attention_heads, nope + cfg.v_head_dim, w.shape[-1])
    return w[:, :nope], w[:, nope:]


def merge_kv_b(w_uk_rows: Any, w_uv: Any) -> Any:
    """The inverse of split_kv_b for numpy arrays: [H, nope, c] and [H, v, c] -> [H * (nope + v), c]."""
    return np.concatenate([w_uk_rows, w_uv], axis=1).reshape(-1, w_uk_rows.shape[-1])


def split_kv_b_names(attn: str) -> tuple[str, str]:
    """mlx-lm's names for the halves of `attn`.kv_b_proj: (embed_q, unembed_out)."""
    return f"{attn}.embed_q", f"{attn}.unembed_out"


def kv_b_as_rows(names: Iterable[str]) -> bool:
    """Whether a checkpoint keeps kv_b_proj whole (Hugging Face, or mlx-lm's deepseek_v2): the
    runtime then holds W_UK as its rows [H, nope, kv_lora] (exact for quantized weights) instead
    of mlx-lm's embed_q [H, kv_lora, nope]."""
    return any(n.endswith(".self_attn.kv_b_proj.weight") for n in names)


def is_mlx_layout(cfg: ModelConfig, names) -> bool:
    """Whether a checkpoint (`names`: its tensor names, anything that supports `in`) is in mlx-lm's
    layout rather than Hugging Face's: a quantization block, stacked routed experts, or kv_b_proj
    split into embed_q."""
    return cfg.quantization is not None or any(
        stacked_name(i, proj) in names for i in cfg.moe_layers for proj in EXPERT_PROJS) or any(
        f"{split_kv_b_names(f'model.layers.{i}.self_attn')[0]}.weight" in names for i in range(cfg.num_hidden_layers))


# --- quantization ---------------------------------------------------------------------------
def quantization_for(cfg: ModelConfig, path: str) -> dict | None:
    """mlx-lm's quantization of module `path` (e.g. "model.layers.3.mlp.switch_mlp.up_proj"):
    config.json's global group_size/bits/mode with any per-module override on top; None when
    the model or that module is not quantized. config.py has validated the block."""
    q = cfg.quantization
    if q is None:
        return None
    override = q.get(path)
    if override is False:
        return None
    out = {"group_size": q.get("group_size"), "bits": q.get("bits"), "mode": q.get("mode", "affine")}
    if isinstance(override, dict):
        out.update({k: override[k] for k in ("group_size", "bits", "mode") if k in override})
    return out


def is_quantized(weight: str, names: Iterable[str] | set[str]) -> bool:
    """Whether `<module>.weight` is stored quantized (it has `<module>.scales` beside it)."""
    return weight.removesuffix("weight") + "scales" in names


def quantizable(name: str, shape: tuple, group_size: int) -> bool:
    """mlx-lm's rule for what to quantize: weights of linear layers (incl. stacked experts and
    per-head stacks) and the embedding whose rows split into whole groups. The router
    (mlp.gate) and norms stay in floating point."""
    if not name.endswith(".weight") or len(shape) < 2 or shape[-1] % group_size:
        return False
    return not (name.endswith("mlp.gate.weight") or "norm" in name.rsplit(".", 2)[-2])


# --- expected tensors -----------------------------------------------------------------------
def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the main model in the Hugging Face layout, with the shape config.json
    implies (MTP layers excluded)."""
    if isinstance(cfg, DeepseekV4Config):
        return _v4_shapes(cfg)
    D, H = cfg.hidden_size, cfg.num_attention_heads
    r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)

    def linear(name: str, out: int, inp: int, bias: bool = False) -> None:
        shapes[f"{name}.weight"] = (out, inp)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    def mlp(prefix: str, inter: int) -> None:
        linear(f"{prefix}.gate_proj", inter, D)
        linear(f"{prefix}.up_proj", inter, D)
        linear(f"{prefix}.down_proj", D, inter)

    bias = cfg.attention_bias
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        a = p + ".self_attn"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
        if cfg.q_lora_rank is None:
            linear(f"{a}.q_proj", H * cfg.qk_head_dim, D)
        else:
            linear(f"{a}.q_a_proj", cfg.q_lora_rank, D, bias)
            shapes[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            linear(f"{a}.q_b_proj", H * cfg.qk_head_dim, cfg.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", r + rope, D, bias)
        shapes[f"{a}.kv_a_layernorm.weight"] = (r,)
        linear(f"{a}.kv_b_proj", H * (cfg.qk_nope_head_dim + cfg.v_head_dim), r)
        linear(f"{a}.o_proj", D, H * cfg.v_head_dim, bias)
        if cfg.sparse_attention:
            x = f"{a}.indexer"
            linear(f"{x}.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
            linear(f"{x}.wk", cfg.index_head_dim, D)
            shapes[f"{x}.k_norm.weight"] = shapes[f"{x}.k_norm.bias"] = (cfg.index_head_dim,)
            linear(f"{x}.weights_proj", cfg.index_n_heads, D)
        if cfg.is_moe_layer(i):
            E = cfg.n_routed_experts
            shapes[f"{p}.mlp.gate.weight"] = (E, D)
            if cfg.topk_method == "noaux_tc":
                shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                mlp(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
            if cfg.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
        else:
            mlp(f"{p}.mlp", cfg.intermediate_size)
    return shapes


def _v4_shapes(cfg: DeepseekV4Config) -> dict[str, tuple[int, ...]]:
    """deepseek_v4 in transformers' names, routed experts one tensor per expert (as DeepSeek-V3's)."""
    D, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    n_hc = cfg.hc_mult
    mix = (2 + n_hc) * n_hc  # the hyper-connection's pre, post and comb weights
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,),
        "model.hc_head.hc_fn": (n_hc, n_hc * D), "model.hc_head.hc_base": (n_hc,), "model.hc_head.hc_scale": (1,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
        for hc in ("attn_hc", "ffn_hc"):
            shapes.update({f"{p}.{hc}.fn": (mix, n_hc * D), f"{p}.{hc}.base": (mix,), f"{p}.{hc}.scale": (3,)})
        shapes.update({
            f"{a}.q_a_proj.weight": (cfg.q_lora_rank, D), f"{a}.q_a_norm.weight": (cfg.q_lora_rank,),
            f"{a}.q_b_proj.weight": (H * hd, cfg.q_lora_rank), f"{a}.kv_proj.weight": (hd, D),
            f"{a}.kv_norm.weight": (hd,), f"{a}.sinks": (H,),
            f"{a}.o_a_proj.weight": (cfg.o_groups * cfg.o_lora_rank, H * hd // cfg.o_groups),
            f"{a}.o_b_proj.weight": (D, cfg.o_groups * cfg.o_lora_rank)})
        m = cfg.compress_rate(i)
        if m:
            c = f"{a}.compressor"
            series = 2 if cfg.layer_types[i] == CSA else 1  # CSA's windows overlap: two series per token
            shapes.update({f"{c}.kv_proj.weight": (series * hd, D), f"{c}.gate_proj.weight": (series * hd, D),
                           f"{c}.position_bias": (m, series * hd), f"{c}.kv_norm.weight": (hd,)})
            if series == 2:
                x, ihd = f"{c}.indexer", cfg.index_head_dim
                shapes.update({f"{x}.kv_proj.weight": (2 * ihd, D), f"{x}.gate_proj.weight": (2 * ihd, D),
                               f"{x}.position_bias": (m, 2 * ihd), f"{x}.kv_norm.weight": (ihd,),
                               f"{x}.q_b_proj.weight": (cfg.index_n_heads * ihd, cfg.q_lora_rank),
                               f"{x}.scorer.weights_proj.weight": (cfg.index_n_heads, D)})
        shapes[f"{p}.mlp.gate.weight"] = (E, D)
        if cfg.is_hash_layer(i):
            shapes[f"{p}.mlp.gate.tid2eid"] = (cfg.vocab_size, cfg.num_experts_per_tok)
        else:
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (E,)
        for mlp in [f"{p}.mlp.experts.{e}" for e in range(E)] + [f"{p}.mlp.shared_experts"]:
            shapes.update({f"{mlp}.gate_proj.weight": (I, D), f"{mlp}.up_proj.weight": (I, D),
                           f"{mlp}.down_proj.weight": (D, I)})
    return shapes
