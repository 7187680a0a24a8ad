"""Static facts about a model directory, read from headers only (no weights loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import layout
from .backends import why_default
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import EdgeDSError

FAMILIES = {"deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3", "kimi_k2": "Kimi-K2",
            "deepseek_v32": "DeepSeek-V3.2", "deepseek_v4": "DeepSeek-V4"}
CACHE_CONTEXTS = (4096, 65536, 1 << 20)  # the contexts `info` prices the prompt cache at


def _cache_dtype() -> tuple[str, int]:
    """(name, bytes) of the MLX runtime's compute dtype, which its caches hold; float32 on a
    machine without MLX (the torch backend's reference runs)."""
    try:
        from .loading import compute_dtype
    except ImportError:
        return "float32", 4
    dtype = compute_dtype()
    return str(dtype).replace("mlx.core.", ""), dtype.size


def model_info(directory: str | Path) -> dict:
    """Family, parameter counts, bits per weight, size, cache cost and the backend load() would pick."""
    directory = Path(directory)
    cfg = ModelConfig.load(directory)
    backend, why = why_default(directory)
    if layout.has_weights(directory):
        total, routed, weight_bytes = _count_safetensors(directory, cfg)
        quantization = cfg.quantization
    elif (directory / layout.ONNX_MANIFEST).is_file():  # an ONNX export only: counts from the config
        manifest = json.loads((directory / layout.ONNX_MANIFEST).read_text(encoding="utf-8"))
        total, routed, weight_bytes = _count_onnx(directory, cfg, manifest)
        quantization = manifest.get("quantization")
    else:
        raise EdgeDSError(f"{directory}: no model weights ({layout.WEIGHTS_GLOB} or {layout.ONNX_MANIFEST})")
    E, k = cfg.n_routed_experts or 1, cfg.num_experts_per_tok
    active = total - routed + routed * k // E
    dtype_name, dtype_size = _cache_dtype()
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return {
        "path": str(directory),
        "family": FAMILIES[cfg.model_type] + ("-Lite" if cfg.model_type == "deepseek_v2" and cfg.q_lora_rank is None else ""),
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(cfg.moe_layers),
        "routed_experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "total_params": total,
        "active_params": active,
        "routed_expert_params": routed,
        "bits_per_weight": round(weight_bytes * 8 / max(total, 1), 3),
        "quantization": quantization,
        # A converted DeepSeek-V4 release keeps its FP4 experts as mxfp4 whatever the rest got.
        "expert_quantization": layout.quantization_for(cfg, layout.stacked_name(cfg.moe_layers[0], "gate_proj")
                                                       .removesuffix(".weight")) if cfg.moe_layers and
                               isinstance(quantization, dict) and "group_size" in quantization else None,
        "size_on_disk_bytes": size,
        # The long-context average: exact for a latent cache (linear); V4's window and open windows
        # weigh nothing at 1M tokens.
        "cache_bytes_per_token": cfg.cache_bytes(CACHE_CONTEXTS[-1], dtype_size) // CACHE_CONTEXTS[-1],
        "cache_bytes_at": {n: cfg.cache_bytes(n, dtype_size) for n in CACHE_CONTEXTS},
        "cache_dtype": dtype_name,
        "backend": backend,
        "backend_reason": why,
        "max_position_embeddings": cfg.max_position_embeddings,
    }


def _count_safetensors(directory: Path, cfg: ModelConfig) -> tuple[int, int, int]:
    """(parameters, routed-expert parameters, bytes) from the headers; quantized words unpacked."""
    ckpt = Checkpoint(directory, layout.WEIGHTS_GLOB)  # the main model: mtp.safetensors left out
    names = set(ckpt.names())
    total = routed = weight_bytes = 0
    for name in sorted(names):
        info = ckpt.info(name)
        weight_bytes += info.nbytes
        if name.endswith((".scales", ".biases")):
            continue
        count = math.prod(info.shape)
        if name.endswith(".weight") and layout.is_quantized(name, names):
            q = layout.quantization_for(cfg, name.removesuffix(".weight")) or {"bits": 4}
            count = count * 32 // q["bits"]  # uint32 words hold 32 / bits values
        total += count
        if layout.is_routed_expert(name):
            routed += count
    return total, routed, weight_bytes


def _count_onnx(directory: Path, cfg: ModelConfig, manifest: dict) -> tuple[int, int, int]:
    """(parameters, routed-expert parameters, bytes) of an ONNX export: the counts config.json
    implies, the bytes of the graph and its external data."""
    shapes = layout.hf_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    routed = sum(math.prod(s) for n, s in shapes.items() if layout.is_routed_expert(n))
    files = [manifest.get("file"), manifest.get("external_data")]
    weight_bytes = sum((directory / f).stat().st_size for f in files if f and (directory / f).is_file())
    return total, routed, weight_bytes
