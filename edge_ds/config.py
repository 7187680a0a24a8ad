"""ModelConfig: the fields of a DeepSeek-family config.json that the runtime uses, validated."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeDSError

# kimi_k2 is deepseek_v3 with more experts; Moonlight ships as deepseek_v3; deepseek_v32 is
# deepseek_v3 plus DeepSeek Sparse Attention (a Lightning Indexer per layer).
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
YARN_TYPES = ("yarn", "deepseek_yarn")
QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
MAX_INT = 2**31 - 1  # MLX shapes are 32-bit
MAX_LAYERS = 4096  # DeepSeek-V3 has 61
MAX_EXPERTS = 65536  # Kimi-K2 has 384


def rope_type(scaling: dict | None) -> str:
    """The RoPE variant a rope_scaling / rope_parameters object names ("default" when none)."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type")) or "default"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_nextn_predict_layers: int = 0
    index_n_heads: int | None = None  # deepseek_v32's Lightning Indexer: heads, head width, tokens kept
    index_head_dim: int | None = None
    index_topk: int | None = None
    quantization: dict | None = None  # mlx-lm's block: group_size, bits, mode (+ per-path overrides)
    raw: dict = field(default_factory=dict, repr=False)

    # --- derived -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Latent values per token per layer: normalised c_kv plus the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek Sparse Attention: each query attends to the index_topk rows its indexer picks."""
        return self.index_topk is not None

    @property
    def cache_row_dim(self) -> int:
        """Values cached per token per layer: the latent, plus the indexer's key with sparse attention."""
        return self.latent_dim + (self.index_head_dim if self.sparse_attention else 0)

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN stretches the context."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rope_type(rs) in YARN_TYPES and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs.get("factor", 1.0), rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict:
        """config.json contents: the original fields with ours written over them."""
        out = dict(self.raw)
        for name in self.__dataclass_fields__:
            if name != "raw":
                out[name] = getattr(self, name)
        if self.quantization is None:
            out.pop("quantization", None)
        if not self.sparse_attention:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                out.pop(name, None)
        out.pop("rope_parameters", None)  # normalised into rope_scaling + rope_theta
        out.pop("quantization_config", None)  # FP8 is dequantized by the converter
        return out

    # --- parsing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        def need(key: str, kind: type | tuple = int) -> Any:
            if key not in d or d[key] is None:
                raise EdgeDSError(f"{source}: missing field '{key}'")
            return check(key, d[key], kind)

        def check(key: str, value: Any, kind: type | tuple) -> Any:
            ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
            if kind == float:
                ok, value = _is_number(value), _to_float(value)
            elif kind == int and ok and not -MAX_INT <= value <= MAX_INT:
                raise EdgeDSError(f"{source}: field '{key}' is {brief(value)}, beyond ±{MAX_INT} (shapes are 32-bit)")
            if not ok:
                need = "a finite number" if kind == float else getattr(kind, "__name__", kind)
                raise EdgeDSError(f"{source}: field '{key}' must be {need}, got {brief(value)}")
            return value

        def opt(key: str, default: Any, kind: type | tuple = int) -> Any:
            v = d.get(key)
            return default if v is None else check(key, v, kind)

        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise EdgeDSError(
                f"{source}: unsupported model_type {brief(model_type)} (edge-ds runs {', '.join(MODEL_TYPES)})"
            )
        is_v3 = model_type != "deepseek_v2"

        rope_scaling, rope_theta = _rope_fields(d, source)
        n_routed = opt("n_routed_experts", None)
        cfg = cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=opt("moe_intermediate_size", need("intermediate_size")),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            kv_lora_rank=need("kv_lora_rank"),
            q_lora_rank=opt("q_lora_rank", None),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            n_routed_experts=n_routed,
            n_shared_experts=opt("n_shared_experts", None),
            num_experts_per_tok=opt("num_experts_per_tok", 1),
            first_k_dense_replace=opt("first_k_dense_replace", 0),
            moe_layer_freq=opt("moe_layer_freq", 1),
            topk_method=opt("topk_method", "noaux_tc" if is_v3 else "greedy", str),
            scoring_func=opt("scoring_func", "sigmoid" if is_v3 else "softmax", str),
            n_group=opt("n_group", 1),
            topk_group=opt("topk_group", 1),
            norm_topk_prob=opt("norm_topk_prob", is_v3, bool),
            routed_scaling_factor=opt("routed_scaling_factor", 1.0, float),
            rms_norm_eps=opt("rms_norm_eps", 1e-6, float),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=opt("max_position_embeddings", 4096),
            tie_word_embeddings=opt("tie_word_embeddings", False, bool),
            attention_bias=opt("attention_bias", False, bool),
            num_nextn_predict_layers=opt("num_nextn_predict_layers", 0),
            index_n_heads=need("index_n_heads") if model_type == "deepseek_v32" else None,
            index_head_dim=need("index_head_dim") if model_type == "deepseek_v32" else None,
            index_topk=need("index_topk") if model_type == "deepseek_v32" else None,
            quantization=opt("quantization", None, dict),
            raw=dict(d),
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise EdgeDSError(f"{path}: not found (is {directory} a model directory?)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise EdgeDSError(f"{path}: cannot read ({e.strerror or e})") from None
        except (ValueError, RecursionError) as e:  # also bad UTF-8, too-long integers, too-deep nesting
            raise EdgeDSError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise EdgeDSError(f"{path}: expected a JSON object")
        return cls.from_dict(d, str(path))

    def validate(self, source: str = "config.json") -> None:
        def fail(msg: str) -> None:
            raise EdgeDSError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                     "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq", "moe_intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                fail(f"field '{name}' must be positive, got {getattr(self, name)}")
        for name in ("first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts"):
            if (getattr(self, name) or 0) < 0:
                fail(f"field '{name}' must not be negative, got {getattr(self, name)}")
        # Layers and experts are iterated (moe_layers, the converter's plan): bound them, so a corrupt
        # value fails here instead of hanging later.
        if self.num_hidden_layers > MAX_LAYERS:
            fail(f"field 'num_hidden_layers' is {self.num_hidden_layers}, over the limit of {MAX_LAYERS}")
        if (self.n_routed_experts or 0) > MAX_EXPERTS:
            fail(f"field 'n_routed_experts' is {self.n_routed_experts}, over the limit of {MAX_EXPERTS}")
        for name in ("rms_norm_eps", "routed_scaling_factor"):
            if not getattr(self, name) > 0:
                fail(f"field '{name}' must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            fail(f"field 'qk_rope_head_dim' must be a positive even number, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail(f"field 'q_lora_rank' must be positive or null, got {self.q_lora_rank}")
        if self.sparse_attention:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if getattr(self, name) <= 0:
                    fail(f"field '{name}' must be positive, got {getattr(self, name)}")
            if self.q_lora_rank is None:
                fail("field 'q_lora_rank': deepseek_v32's indexer reads the query latent, so it must be set")
            if self.index_head_dim < self.qk_rope_head_dim:
                fail(f"field 'index_head_dim' ({self.index_head_dim}) must be at least qk_rope_head_dim "
                     f"({self.qk_rope_head_dim}): the indexer ropes that many of its dims")
        if self.topk_method not in TOPK_METHODS:
            fail(f"field 'topk_method' must be one of {TOPK_METHODS}, got {brief(self.topk_method)}")
        if self.scoring_func not in SCORING_FUNCS:
            fail(f"field 'scoring_func' must be one of {SCORING_FUNCS}, got {brief(self.scoring_func)}")
        if self.n_routed_experts is not None:
            e = self.n_routed_experts
            if e <= 0:
                fail(f"field 'n_routed_experts' must be positive, got {e}")
            if self.num_experts_per_tok > e:
                fail(f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds n_routed_experts ({e})")
            if e % self.n_group:
                fail(f"field 'n_routed_experts' ({e}) is not divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                fail(f"field 'topk_group' ({self.topk_group}) exceeds n_group ({self.n_group})")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and e // self.n_group < 2:
                fail("field 'n_group': noaux_tc needs at least 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * (e // self.n_group):
                fail(f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in "
                     f"topk_group ({self.topk_group}) groups")
        if self.rope_scaling is not None:
            rtype = rope_type(self.rope_scaling)
            if rtype not in (*YARN_TYPES, "default"):
                fail(f"field 'rope_scaling.type' {brief(rtype)} is not supported (yarn or default)")
            if rtype in YARN_TYPES:
                for k in ("factor", "original_max_position_embeddings"):
                    if not isinstance(self.rope_scaling.get(k), (int, float)):
                        fail(f"field 'rope_scaling.{k}' is required for yarn")
                # What rope.py and softmax_scale compute with: logs of the first four, so positive.
                for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "attention_factor"):
                    v = self.rope_scaling.get(k)
                    if v is not None and not (_is_number(v) and (v > 0 or k.startswith(("mscale", "attention")))):
                        fail(f"field 'rope_scaling.{k}' must be a positive finite number, got {brief(v)}")
        if self.quantization is not None:
            q = self.quantization
            for k in ("group_size", "bits"):
                if isinstance(q.get(k), bool) or not isinstance(q.get(k), int) or q[k] <= 0:
                    fail(f"field 'quantization.{k}' must be a positive integer, got {brief(q.get(k))}")
            if q.get("mode", "affine") not in QUANT_MODES:
                fail(f"field 'quantization.mode' must be one of {QUANT_MODES}, got {brief(q.get('mode'))}")


def _rope_fields(d: dict, source: str) -> tuple[dict | None, float]:
    """rope_scaling (legacy) or rope_parameters (transformers 5) -> (scaling dict or None, theta)."""
    theta = d.get("rope_theta")
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if scaling is None and isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if rope_type(params) != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise EdgeDSError(f"{source}: field 'rope_scaling' must be an object or null")
        scaling = dict(scaling)
        if rope_type(scaling) == "default":
            scaling = None
    if theta is None:
        theta = 10000.0
    if not _is_number(theta) or theta <= 0:
        raise EdgeDSError(f"{source}: field 'rope_theta' must be a positive finite number, got {brief(theta)}")
    return scaling, float(theta)


def _is_number(v: Any) -> bool:
    """A JSON number that is a finite float (NaN, Infinity and integers past float range are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= sys.float_info.max if isinstance(v, int) else math.isfinite(v)


def _to_float(v: Any) -> Any:
    return float(v) if _is_number(v) else v


def brief(value: Any) -> str:
    """repr(value) for an error message, cut short: a corrupt file's value can be megabytes."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer past Python's 4300-digit limit, or too deep a nesting
        return "(a value too large to show)"
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"
