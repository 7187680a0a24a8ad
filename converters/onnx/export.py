"""`edge-ds export-onnx`: Hugging Face DeepSeek checkpoint (BF16/F32, or FP8 with 128x128 block
scales) -> a directory onnxruntime runs: model.onnx (+ model.onnx.data when large), config.json,
the tokenizer files and onnx.json (inputs, outputs, quantization).

Tensors are read one at a time and quantized at once, so the peak is the quantized model plus
one float tensor. Everything is written into a hidden temporary directory renamed to DST at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edge_ds.checkpoint import Checkpoint
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError

from ..fp8 import dequantize_fp8_blocks
from .graph import build_model, io_names
from .quant import BlockQuant

MANIFEST = "onnx.json"
MODEL = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
EXTERNAL_ABOVE = 1 << 30  # protobuf caps a file at 2 GB; go external well before
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "LICENSE", "LICENSE.txt")

Progress = Callable[[int, int, str], None]


def export_onnx(src: str | Path, dst: str | Path, bits: int = 4, block_size: int = 32, accuracy_level: int = 4,
                progress: Progress | None = None) -> Path:
    """Exports SRC into a new directory DST; SRC is only read."""
    src, dst = Path(src), Path(dst)
    if bits not in (4, 8):
        raise EdgeDSError(f"--bits must be 4 or 8, got {bits}")
    if block_size not in (32, 64, 128):
        raise EdgeDSError(f"--block-size must be 32, 64 or 128, got {block_size}")
    if accuracy_level not in (0, 4):
        raise EdgeDSError(f"--accuracy-level must be 0 or 4, got {accuracy_level}")
    if not src.is_dir():
        raise EdgeDSError(f"{src}: not a directory")
    if dst.exists():
        raise EdgeDSError(f"{dst}: already exists; choose a new output directory")
    cfg = ModelConfig.load(src)
    if cfg.quantization is not None:
        raise EdgeDSError(f"{src}: an MLX-quantized directory; export-onnx reads Hugging Face checkpoints "
                          f"(BF16, F32 or FP8)")
    if cfg.n_routed_experts is not None:
        for name, width in (("hidden_size", cfg.hidden_size), ("moe_intermediate_size", cfg.moe_intermediate_size)):
            if width % block_size:
                raise EdgeDSError(f"{src}/config.json: {name} ({width}) must be a multiple of --block-size "
                                  f"({block_size}) for onnxruntime's QMoE")
    quant = BlockQuant(bits, block_size, accuracy_level)

    ckpt = Checkpoint(src)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        reader = TensorReader(cfg, ckpt, progress)
        model = build_model(cfg, reader, quant)
        size = sum(t.ByteSize() for t in model.graph.initializer)
        if progress:
            progress(reader.total, reader.total, "writing")
        external = size > EXTERNAL_ABOVE
        onnx.save_model(model, str(tmp / MODEL), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
        onnx.checker.check_model(str(tmp / MODEL))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        manifest = {"format": "edge-ds-onnx-v1", "model_type": cfg.model_type, "file": MODEL,
                    "external_data": EXTERNAL_DATA if external else None,
                    "quantization": {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
                                     "symmetric": True},
                    "num_layers": cfg.num_hidden_layers, "latent_dim": cfg.latent_dim,
                    "kv_lora_rank": cfg.kv_lora_rank, "vocab_size": cfg.vocab_size,
                    "max_position_embeddings": cfg.max_position_embeddings, **io_names(cfg)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return dst


class TensorReader:
    """name -> float32 array in the Hugging Face layout: FP8 dequantized with the fixed 128x128
    rule, shape checked against config.json, NaN/Inf refused."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None):
        self.cfg, self.ckpt, self.progress = cfg, ckpt, progress
        self.expected = expected_shapes(cfg)
        self.total = len(self.expected)
        self.done = 0

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.ckpt and ".experts." in name:
            raise EdgeDSError(f"{self.ckpt.directory}: tensor '{name}' is missing from the checkpoint")
        info = self.ckpt.info(name)
        w = self.ckpt.read(name)
        if info.dtype == "F8_E4M3":
            scale = name + "_scale_inv"
            if scale not in self.ckpt:
                raise EdgeDSError(f"{info.path}: FP8 tensor '{name}' has no '{scale}'")
            w = dequantize_fp8_blocks(w, self.ckpt.read(scale).astype(np.float32), name=name)
        w = np.asarray(w).astype(np.float32, copy=False)
        want = self.expected.get(name)
        if want is not None and tuple(w.shape) != want:
            raise EdgeDSError(f"{info.path}: tensor '{name}' has shape {list(w.shape)}, config.json implies {list(want)}")
        if not np.isfinite(w).all():
            raise EdgeDSError(f"{info.path}: tensor '{name}' has {int((~np.isfinite(w)).sum())} NaN/Inf values")
        self.done += 1
        if self.progress:
            self.progress(min(self.done, self.total), self.total, re.sub(r"^model\.layers\.(\d+)\..*", r"layer \1", name))
        return w


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
            shapes.update({f"{a}.q_a_proj.weight": (cfg.q_lora_rank, D), f"{a}.q_a_layernorm.weight": (cfg.q_lora_rank,),
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
