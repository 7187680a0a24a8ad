"""Readers that give the exporter float32 tensors under Hugging Face names, from either a
Hugging Face checkpoint (BF16/F32, or FP8 with 128x128 block scales) or an edge-ds / mlx-lm
converted directory (affine or mx quantized weights, experts stacked as switch_mlp, kv_b_proj
split into embed_q/unembed_out for deepseek_v3)."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from edge_ds.checkpoint import Checkpoint
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError

from ..fp8 import read_float32

Progress = Callable[[int, int, str], None]


class TensorReader:
    """name -> float32 array in the Hugging Face layout, shape checked against config.json,
    NaN/Inf refused. Subclasses say how a name is found in their directory."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None):
        self.cfg, self.ckpt, self.progress = cfg, ckpt, progress
        self.expected = expected_shapes(cfg)
        self.total = len(self.expected)
        self.done = 0

    def __call__(self, name: str) -> np.ndarray:
        w, where = self.fetch(name)
        want = self.expected.get(name)
        if want is not None and tuple(w.shape) != want:
            raise EdgeDSError(f"{where}: tensor '{name}' has shape {list(w.shape)}, config.json implies {list(want)}")
        if not np.isfinite(w).all():
            raise EdgeDSError(f"{where}: tensor '{name}' has {int((~np.isfinite(w)).sum())} NaN/Inf values")
        self.done += 1
        if self.progress:
            label = re.sub(r"^model\.layers\.(\d+)\..*", r"layer \1", name)
            self.progress(min(self.done, self.total), self.total, label)
        return w

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def missing(self, name: str) -> EdgeDSError:
        return EdgeDSError(f"{self.ckpt.directory}: tensor '{name}' is missing from the checkpoint")


class HFReader(TensorReader):
    """FP8 weights are dequantized with the fixed 128x128 rule (never inferred from shapes)."""

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        if name not in self.ckpt:
            raise self.missing(name)
        return read_float32(self.ckpt, name), str(self.ckpt.info(name).path)


class MLXReader(TensorReader):
    """An mlx-lm layout directory: quantized weights are dequantized with MLX itself (the
    exporter then re-quantizes them to onnxruntime's symmetric blocks)."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None):
        super().__init__(cfg, ckpt, progress)
        self._stack: tuple[str, np.ndarray] | None = None  # the last switch_mlp stack read

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        m = re.match(r"^(.*\.mlp)\.experts\.(\d+)\.(\w+)\.weight$", name)
        if m:
            stacked = f"{m.group(1)}.switch_mlp.{m.group(3)}.weight"
            if self._stack is None or self._stack[0] != stacked:
                self._stack = stacked, self.dense(stacked)
            return self._stack[1][int(m.group(2))], str(self.ckpt.info(stacked).path)
        if name.endswith("self_attn.kv_b_proj.weight") and name not in self.ckpt:
            base = name[: -len("kv_b_proj.weight")]
            wk = self.dense(base + "embed_q.weight").transpose(0, 2, 1)  # [H, nope, kv_lora]
            wv = self.dense(base + "unembed_out.weight")  # [H, v, kv_lora]
            return np.concatenate([wk, wv], axis=1).reshape(-1, wk.shape[-1]), str(self.ckpt.info(base + "embed_q.weight").path)
        return self.dense(name), str(self.ckpt.info(name).path)

    def dense(self, name: str) -> np.ndarray:
        import mlx.core as mx

        if name not in self.ckpt:
            raise self.missing(name)
        base = name[: -len("weight")]
        w = self.ckpt.read(name)
        if base + "scales" not in self.ckpt:
            return np.asarray(w).astype(np.float32, copy=False)
        q = self.quantization(name)
        biases = self.ckpt.read(base + "biases") if base + "biases" in self.ckpt else None
        out = mx.dequantize(mx.array(w), mx.array(self.ckpt.read(base + "scales")),
                            None if biases is None else mx.array(biases.astype(np.float32)),
                            group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
        return np.array(out.astype(mx.float32))

    def quantization(self, name: str) -> dict:
        block = self.cfg.quantization or {}
        override = block.get(name[: -len(".weight")])
        q = override if isinstance(override, dict) else block
        if "group_size" not in q or "bits" not in q:
            raise EdgeDSError(f"{self.ckpt.directory}/config.json: no quantization parameters for '{name}'")
        return q


def open_reader(cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None) -> TensorReader:
    """An mlx-lm layout directory (quantization block or switch_mlp stacks) or a Hugging Face one."""
    mlx_layout = cfg.quantization is not None or any(".switch_mlp." in n for n in ckpt.names())
    return (MLXReader if mlx_layout else HFReader)(cfg, ckpt, progress)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The shapes of the Hugging Face checkpoint tensors the graph reads."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, r, rope = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)

    def mlp(prefix: str, inter: int) -> None:
        shapes.update({f"{prefix}.gate_proj.weight": (inter, D), f"{prefix}.up_proj.weight": (inter, D),
                       f"{prefix}.down_proj.weight": (D, inter)})

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        a = p + ".self_attn"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       f"{a}.kv_a_proj_with_mqa.weight": (r + rope, D), f"{a}.kv_a_layernorm.weight": (r,),
                       f"{a}.kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), r),
                       f"{a}.o_proj.weight": (D, H * cfg.v_head_dim)})
        if cfg.q_lora_rank is None:
            shapes[f"{a}.q_proj.weight"] = (H * qk, D)
        else:
            shapes.update({f"{a}.q_a_proj.weight": (cfg.q_lora_rank, D),
                           f"{a}.q_a_layernorm.weight": (cfg.q_lora_rank,),
                           f"{a}.q_b_proj.weight": (H * qk, cfg.q_lora_rank)})
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
