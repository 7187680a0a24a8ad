"""Build an MLX model from a model directory (mlx-lm layout, or an unconverted BF16/F32 HF dir).

The steps, in order: read config.json; pick the module layout the checkpoint needs (W_UK as
kv_b_proj rows or as mlx-lm's embed_q: models.build); read the main model's tensors
(lazily: a tensor left out is never read); rename them to module names (Model.sanitize);
swap in quantized modules where the checkpoint holds scales; cast and load.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import layout
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import EdgeDSError
from . import models
from .models.moe import MoE


def compute_dtype() -> mx.Dtype:
    """float32 on the CPU backend (its half-precision kernels are several times slower), else bfloat16."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def weight_files(directory: Path) -> list[Path]:
    """The main model's safetensors: the index's shards, else model*.safetensors (never mtp.safetensors)."""
    with Checkpoint(directory, layout.WEIGHTS_GLOB) as ckpt:
        return ckpt.files()


def read_weights(directory: Path, keep=lambda name: True) -> dict[str, mx.array]:
    """The main model's tensors for which keep(name) holds, as lazy MLX arrays (read when evaluated)."""
    weights = {}
    for f in weight_files(directory):
        try:
            weights.update({k: v for k, v in mx.load(str(f)).items() if keep(k)})
        except Exception as e:
            raise EdgeDSError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def load_model(path: str | Path, dtype: mx.Dtype | None = None, routed_experts: bool = True) -> nn.Module:
    """routed_experts=False loads the trunk only: routed-expert tensors are never read and each
    MoE layer is left without `switch_mlp`, for experts.attach_experts to provide."""
    directory = Path(path)
    cfg = ModelConfig.load(directory)
    keep = (lambda name: True) if routed_experts else (lambda name: not layout.is_routed_expert(name))
    weights = read_weights(directory, keep)
    if any(layout.is_fp8_scale(k) for k in weights):
        raise EdgeDSError(f"{directory}: an FP8 checkpoint; convert it to MLX weights first (edge-ds convert)")
    model = models.build(cfg, weights)
    if not routed_experts:
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.pop("switch_mlp")
    weights = model.sanitize(weights)

    def quantize_predicate(p: str, m: nn.Module):
        if not layout.is_quantized(f"{p}.weight", weights):
            return False
        q = layout.quantization_for(cfg, p)
        if q is None:
            raise EdgeDSError(f"{directory / layout.CONFIG_FILE}: '{p}' is quantized but config.json has no "
                              "'quantization'")
        return q

    nn.quantize(model, class_predicate=quantize_predicate)

    dtype = dtype or compute_dtype()
    model.dtype = dtype
    for k, v in weights.items():
        if layout.keeps_float32(k):
            weights[k] = v.astype(mx.float32)
        elif mx.issubdtype(v.dtype, mx.floating):
            weights[k] = v.astype(dtype)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise EdgeDSError(f"{directory}: weights do not match config.json ({e})") from None
    mx.eval(model.parameters())
    return model
