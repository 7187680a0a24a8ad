"""ModelConfig: the fields of a DeepSeek-family config.json that the runtime uses, validated."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import EdgeDSError

# kimi_k2 is deepseek_v3 with more experts; Moonlight ships as deepseek_v3; deepseek_v32 is
# deepseek_v3 plus DeepSeek Sparse Attention (a Lightning Indexer per layer).
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "deepseek_v4")
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


class Fields:
    """Reads the fields of config.json's object `d`, each error naming `source` and the field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def need(self, key: str, kind: type | tuple = int) -> Any:
        if key not in self.d or self.d[key] is None:
            raise EdgeDSError(f"{self.source}: missing field '{key}'")
        return self.check(key, self.d[key], kind)

    def opt(self, key: str, default: Any, kind: type | tuple = int) -> Any:
        v = self.d.get(key)
        return default if v is None else self.check(key, v, kind)

    def check(self, key: str, value: Any, kind: type | tuple) -> Any:
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        if kind == float:
            ok, value = _is_number(value), _to_float(value)
        elif kind == int and ok and not -MAX_INT <= value <= MAX_INT:
            raise EdgeDSError(f"{self.source}: field '{key}' is {brief(value)}, beyond ±{MAX_INT} (shapes are 32-bit)")
        if not ok:
            need = "a finite number" if kind == float else getattr(kind, "__name__", kind)
            raise EdgeDSError(f"{self.source}: field '{key}' must be {need}, got {brief(value)}")
        return value


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
    swiglu_limit: float | None = None  # DeepSeek-V4 caps its SwiGLU inputs; earlier families do not
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

    def cache_bytes(self, context: int, itemsize: int) -> int:
        """Bytes the prompt cache holds after `context` tokens of values `itemsize` bytes wide."""
        return self.num_hidden_layers * context * self.cache_row_dim * itemsize

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
        if self.swiglu_limit is None:
            out.pop("swiglu_limit")
        if not self.sparse_attention:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                out.pop(name, None)
        out.pop("rope_parameters", None)  # normalised into rope_scaling + rope_theta
        out.pop("quantization_config", None)  # FP8 is dequantized by the converter
        return out

    # --- parsing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """The config of `d` (config.json's object), validated; deepseek_v4 gets its own class."""
        if d.get("model_type") == "deepseek_v4":
            return DeepseekV4Config.from_dict(d, source)
        f = Fields(d, source)
        need, opt = f.need, f.opt

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
        check_rope(self.rope_scaling, "rope_scaling", fail)
        check_quantization(self.quantization, fail)


# --- DeepSeek-V4 ------------------------------------------------------------------------------
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")
V4_SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
CSA, HCA = V4_LAYER_TYPES[1], V4_LAYER_TYPES[2]
V4_DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}
V4_DEFAULT_HASH_LAYERS = 3
V4_LEGACY_KEYS = ("compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim",
                  "rope_scaling")


@dataclass
class DeepseekV4Config(ModelConfig):
    """deepseek_v4 (V4-Flash, V4-Pro, V4-Flash-Base): every field of transformers' DeepseekV4Config
    the forward pass reads, legacy spellings folded in as transformers folds them.

    The ModelConfig fields keep their meaning where V4 has one (experts, vocabulary, layers);
    V4 has no latent projection, so kv_lora_rank is 0 and the per-token row is the one shared
    KV head: latent_dim = head_dim, qk_rope_head_dim of it roped (at its end)."""

    head_dim: int = 512
    num_key_value_heads: int = 1
    layer_types: list = field(default_factory=list)  # per layer, one of V4_LAYER_TYPES
    compress_rates: dict = field(default_factory=lambda: dict(V4_DEFAULT_COMPRESS_RATES))
    mlp_layer_types: list = field(default_factory=list)  # per layer, one of V4_MLP_LAYER_TYPES
    compress_rope_theta: float = 160000.0
    compress_rope_scaling: dict | None = None  # YaRN of the compressed branches (attention_factor 1)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    expert_dtype: str | None = None  # the release's routed experts: "fp4", "fp8" (the converter's business)

    # --- derived -------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.head_dim

    @property
    def cache_row_dim(self) -> int:
        return self.head_dim

    @property
    def sparse_attention(self) -> bool:
        return CSA in self.layer_types

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    def compress_rate(self, i: int) -> int:
        """Layer i's compression ratio m: one compressed entry per m tokens (0: sliding window only)."""
        t = self.layer_types[i]
        return 0 if t == "sliding_attention" else self.compress_rates[t]

    def is_hash_layer(self, i: int) -> bool:
        return self.mlp_layer_types[i] == "hash_moe"

    def is_moe_layer(self, i: int) -> bool:
        return True

    def cache_bytes(self, context: int, itemsize: int) -> int:
        """What V4's cache holds after `context` tokens: per layer a window of sliding_window - 1 KV rows
        and, per compressor (and CSA's indexer) of width w, one entry per m tokens, the open
        window's tokens (kv and gate, s = 2 series for CSA else 1) and CSA's previous-window overlap."""
        total = 0
        for i in range(self.num_hidden_layers):
            total += min(context, self.sliding_window - 1) * self.head_dim
            m = self.compress_rate(i)
            if not m:
                continue
            csa = self.layer_types[i] == CSA
            for w in (self.head_dim, self.index_head_dim) if csa else (self.head_dim,):
                total += context // m * w + context % m * (2 if csa else 1) * w * 2
                if csa and context >= m:
                    total += m * w * 2
        return total * itemsize

    # --- parsing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "DeepseekV4Config":
        f = Fields(d, source)
        need, opt = f.need, f.opt
        n = need("num_hidden_layers")
        if not 0 < n <= MAX_LAYERS:
            raise EdgeDSError(f"{source}: field 'num_hidden_layers' must be in 1..{MAX_LAYERS}, got {n}")
        head_dim = opt("head_dim", 512)
        rates = dict(V4_DEFAULT_COMPRESS_RATES)
        rates.update(opt("compress_rates", {}, dict))
        for key, t in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
            rates[t] = opt(key, rates.get(t))
        for t, r in rates.items():
            if t not in (CSA, HCA):
                raise EdgeDSError(f"{source}: field 'compress_rates' has unknown layer type {brief(t)} "
                                  f"(expected {CSA!r}, {HCA!r})")
            f.check(f"compress_rates.{t}", r, int)
            if r < 1:
                raise EdgeDSError(f"{source}: field 'compress_rates.{t}' must be positive, got {r}")
        layer_types = _v4_schedule(f, n, "layer_types", V4_LAYER_TYPES, _legacy_layer_types(f, n, rates))
        n_hash = opt("num_hash_layers", V4_DEFAULT_HASH_LAYERS)
        mlp_default = ["hash_moe"] * min(n, max(n_hash, 0)) + ["moe"] * max(0, n - n_hash)
        mlp_layer_types = _v4_schedule(f, n, "mlp_layer_types", V4_MLP_LAYER_TYPES, mlp_default)

        factor = opt("partial_rotary_factor", None, float)
        if factor is None:
            legacy_rope = opt("qk_rope_head_dim", None)
            factor = legacy_rope / head_dim if legacy_rope is not None and head_dim > 0 else 64 / 512
        if not 0 < factor <= 1:
            raise EdgeDSError(f"{source}: field 'partial_rotary_factor' must be in (0, 1], got {brief(factor)}")
        rope = int(head_dim * factor)
        (main_theta, main_scaling), (compress_theta, compress_scaling) = _v4_rope(f)
        if opt("hidden_act", "silu", str) != "silu":
            raise EdgeDSError(f"{source}: field 'hidden_act' must be 'silu' for deepseek_v4, got {brief(d['hidden_act'])}")
        for key in ("attention_bias", "mlp_bias"):
            if opt(key, False, bool):
                raise EdgeDSError(f"{source}: field '{key}' is true; DeepSeek-V4 has no biases there")
        moe_inter = need("moe_intermediate_size")
        q = d.get("quantization_config")
        expert_dtype = opt("expert_dtype", q.get("expert_dtype") if isinstance(q, dict) else None, str)
        cfg = cls(
            model_type="deepseek_v4",
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=moe_inter,
            moe_intermediate_size=moe_inter,
            num_hidden_layers=n,
            num_attention_heads=need("num_attention_heads"),
            kv_lora_rank=0,
            q_lora_rank=need("q_lora_rank"),
            qk_nope_head_dim=head_dim - rope,
            qk_rope_head_dim=rope,
            v_head_dim=head_dim,
            n_routed_experts=need("n_routed_experts"),
            n_shared_experts=opt("n_shared_experts", 1),
            num_experts_per_tok=need("num_experts_per_tok"),
            topk_method="noaux_tc",
            scoring_func=opt("scoring_func", "sqrtsoftplus", str),
            norm_topk_prob=opt("norm_topk_prob", True, bool),
            routed_scaling_factor=opt("routed_scaling_factor", 1.5, float),
            rms_norm_eps=opt("rms_norm_eps", 1e-6, float),
            rope_theta=main_theta,
            rope_scaling=main_scaling,
            max_position_embeddings=opt("max_position_embeddings", 1048576),
            tie_word_embeddings=opt("tie_word_embeddings", False, bool),
            num_nextn_predict_layers=opt("num_nextn_predict_layers", 0),
            index_n_heads=opt("index_n_heads", 64),
            index_head_dim=opt("index_head_dim", 128),
            index_topk=opt("index_topk", 512),
            quantization=opt("quantization", None, dict),
            raw=dict(d),
            head_dim=head_dim,
            num_key_value_heads=opt("num_key_value_heads", 1),
            layer_types=layer_types,
            compress_rates=rates,
            mlp_layer_types=mlp_layer_types,
            compress_rope_theta=compress_theta,
            compress_rope_scaling=compress_scaling,
            hc_mult=opt("hc_mult", 4),
            hc_sinkhorn_iters=opt("hc_sinkhorn_iters", 20),
            hc_eps=opt("hc_eps", 1e-6, float),
            swiglu_limit=opt("swiglu_limit", 10.0, float),
            sliding_window=opt("sliding_window", 128),
            o_groups=opt("o_groups", 8),
            o_lora_rank=opt("o_lora_rank", 1024),
            expert_dtype=expert_dtype,
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config.json") -> None:
        def fail(msg: str) -> None:
            raise EdgeDSError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_attention_heads", "head_dim",
                     "q_lora_rank", "n_routed_experts", "num_experts_per_tok", "max_position_embeddings",
                     "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters",
                     "sliding_window", "o_groups", "o_lora_rank"):
            if getattr(self, name) <= 0:
                fail(f"field '{name}' must be positive, got {getattr(self, name)}")
        for name in ("rms_norm_eps", "routed_scaling_factor", "swiglu_limit", "hc_eps", "rope_theta",
                     "compress_rope_theta"):
            if not getattr(self, name) > 0:
                fail(f"field '{name}' must be positive, got {getattr(self, name)}")
        if self.num_nextn_predict_layers < 0:
            fail(f"field 'num_nextn_predict_layers' must not be negative, got {self.num_nextn_predict_layers}")
        if self.n_routed_experts > MAX_EXPERTS:
            fail(f"field 'n_routed_experts' is {self.n_routed_experts}, over the limit of {MAX_EXPERTS}")
        if self.num_key_value_heads != 1:
            fail(f"field 'num_key_value_heads' must be 1 (DeepSeek-V4 shares one KV head), got {self.num_key_value_heads}")
        if self.n_shared_experts != 1:
            fail(f"field 'n_shared_experts' must be 1 for deepseek_v4, got {self.n_shared_experts}")
        if not 0 < self.qk_rope_head_dim <= self.head_dim or self.qk_rope_head_dim % 2:
            fail(f"field 'partial_rotary_factor' gives {self.qk_rope_head_dim} rotary dims of head_dim "
                 f"{self.head_dim}; it must be a positive even number no larger than head_dim")
        if self.num_attention_heads % self.o_groups:
            fail(f"field 'o_groups' ({self.o_groups}) must divide num_attention_heads ({self.num_attention_heads})")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail(f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds n_routed_experts "
                 f"({self.n_routed_experts})")
        if self.scoring_func not in V4_SCORING_FUNCS:
            fail(f"field 'scoring_func' must be one of {V4_SCORING_FUNCS}, got {brief(self.scoring_func)}")
        check_rope(self.rope_scaling, "rope_parameters.main", fail)
        check_rope(self.compress_rope_scaling, "rope_parameters.compress", fail)
        check_quantization(self.quantization, fail)

    def to_dict(self) -> dict:
        """config.json contents in transformers' current spelling (legacy keys folded in)."""
        out = {k: v for k, v in self.raw.items() if k not in V4_LEGACY_KEYS and k != "quantization_config"}
        for name in ("model_type", "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "q_lora_rank", "n_routed_experts",
                     "n_shared_experts", "num_experts_per_tok", "scoring_func", "norm_topk_prob",
                     "routed_scaling_factor", "rms_norm_eps", "rope_theta", "compress_rope_theta",
                     "max_position_embeddings", "tie_word_embeddings", "num_nextn_predict_layers",
                     "index_n_heads", "index_head_dim", "index_topk", "layer_types", "compress_rates",
                     "mlp_layer_types", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit",
                     "sliding_window", "o_groups", "o_lora_rank", "quantization"):
            out[name] = getattr(self, name)
        out["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        if self.quantization is None:
            out.pop("quantization")
        if self.expert_dtype is not None:
            out["expert_dtype"] = self.expert_dtype
        part = {"partial_rotary_factor": out["partial_rotary_factor"]}
        out["rope_parameters"] = {
            "main": {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta, **part},
            "compress": {**(self.compress_rope_scaling or {"rope_type": "default"}),
                         "rope_theta": self.compress_rope_theta, **part}}
        return out


def _legacy_layer_types(f: Fields, n: int, rates: dict) -> list[str]:
    """layer_types when config.json has none: from the legacy per-layer `compress_ratios`, else
    transformers' default (two HCA layers, then CSA and HCA alternating)."""
    ratios = f.opt("compress_ratios", None, list)
    if ratios is None:
        return [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    by_rate = {0: "sliding_attention", rates[CSA]: CSA, rates[HCA]: HCA}
    out = []
    for i, r in enumerate(ratios[:n]):
        if not isinstance(r, int) or isinstance(r, bool) or r not in by_rate:
            raise EdgeDSError(f"{f.source}: field 'compress_ratios[{i}]' is {brief(r)}; expected 0, "
                              f"{rates[CSA]} (CSA) or {rates[HCA]} (HCA)")
        out.append(by_rate[r])
    return out


def _v4_schedule(f: Fields, n: int, key: str, allowed: tuple, default: list) -> list[str]:
    """A per-layer list of names (layer_types, mlp_layer_types): at least num_hidden_layers entries
    (more belong to the MTP layers and are dropped, as transformers drops them), each allowed."""
    values = f.opt(key, default, list)
    if len(values) < n:
        raise EdgeDSError(f"{f.source}: field '{key}' has {len(values)} entries for {n} layers")
    for i, v in enumerate(values[:n]):
        if v not in allowed:
            raise EdgeDSError(f"{f.source}: field '{key}[{i}]' is {brief(v)}; expected one of {', '.join(allowed)}")
    return list(values[:n])


def _v4_rope(f: Fields) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((theta, scaling) of the sliding layers, (theta, scaling) of the compressed branches).

    rope_parameters nested as {"main": .., "compress": ..} (transformers' spelling), or one flat
    object / legacy rope_scaling whose YaRN applies to the compressed branches only, with
    attention_factor 1 (DeepSeek's reference does not scale cos/sin by YaRN's mscale)."""
    d = f.d
    rp = d.get("rope_parameters") if d.get("rope_parameters") is not None else d.get("rope_scaling")
    if rp is not None and not isinstance(rp, dict):
        raise EdgeDSError(f"{f.source}: field 'rope_parameters' must be an object or null")
    rp = rp or {}
    main_theta = f.opt("rope_theta", 10000.0, float)
    compress_theta = f.opt("compress_rope_theta", 160000.0, float)

    def part(name: str, obj: Any, theta: float) -> tuple[float, dict | None]:
        if not isinstance(obj, dict):
            raise EdgeDSError(f"{f.source}: field 'rope_parameters.{name}' must be an object")
        theta = Fields(obj, f.source).opt("rope_theta", theta, float)
        scaling = {k: v for k, v in obj.items() if k not in ("rope_theta", "partial_rotary_factor")}
        return theta, (scaling if rope_type(scaling) != "default" else None)

    if "main" in rp or "compress" in rp:
        return part("main", rp.get("main"), main_theta), part("compress", rp.get("compress"), compress_theta)
    main_theta = Fields(rp, f.source).opt("rope_theta", main_theta, float)
    _, scaling = part("compress", rp, compress_theta)
    if scaling is not None and rope_type(scaling) in YARN_TYPES:
        scaling.setdefault("attention_factor", 1.0)
    return (main_theta, None), (compress_theta, scaling)


def check_rope(scaling: dict | None, name: str, fail: Callable[[str], None]) -> None:
    """A RoPE scaling object (config field `name`) that rope.py can compute with: yarn or default."""
    if scaling is None:
        return
    rtype = rope_type(scaling)
    if rtype not in (*YARN_TYPES, "default"):
        fail(f"field '{name}.type' {brief(rtype)} is not supported (yarn or default)")
    if rtype in YARN_TYPES:
        for k in ("factor", "original_max_position_embeddings"):
            if not isinstance(scaling.get(k), (int, float)):
                fail(f"field '{name}.{k}' is required for yarn")
        # What rope.py and softmax_scale compute with: logs of the first four, so positive.
        for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim", "attention_factor"):
            v = scaling.get(k)
            if v is not None and not (_is_number(v) and (v > 0 or k.startswith(("mscale", "attention")))):
                fail(f"field '{name}.{k}' must be a positive finite number, got {brief(v)}")


def check_quantization(q: dict | None, fail: Callable[[str], None]) -> None:
    """mlx-lm's `quantization` block: group_size, bits, mode."""
    if q is None:
        return
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
