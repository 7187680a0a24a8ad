"""Build an MLX model from a model directory (mlx-lm layout, or an unconverted BF16/F32 HF dir)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import EdgeDSError
from .models.deepseek import Model
from .models.moe import MoE


def compute_dtype() -> mx.Dtype:
    """float32 on the CPU backend (its half-precision kernels are 8-35x slower), else bfloat16."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def weight_files(directory: Path) -> list[Path]:
    """The main-model safetensors: the index's shards, else model*.safetensors (never mtp.safetensors)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise EdgeDSError(f"{index}: not a valid safetensors index ({e})") from None
        files = [directory / n for n in names]
        for f in files:
            if not f.is_file():
                raise EdgeDSError(f"{f}: shard named in {index.name} is missing")
        return files
    files = [Path(p) for p in sorted(glob.glob(str(directory / "model*.safetensors")))]
    if not files:
        raise EdgeDSError(f"{directory}: no model*.safetensors weights found")
    return files


def read_weights(directory: Path) -> dict[str, mx.array]:
    weights = {}
    for f in weight_files(directory):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise EdgeDSError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def quantization_of(cfg: ModelConfig, path: str) -> dict | None:
    """mlx-lm's quantization block: global group_size/bits/mode with per-module overrides."""
    q = cfg.quantization
    if not q:
        return None
    override = q.get(path)
    if override is False:
        return None
    base = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4), "mode": q.get("mode", "affine")}
    if isinstance(override, dict):
        base.update({k: override[k] for k in ("group_size", "bits", "mode") if k in override})
    return base


def load_model(path: str | Path, dtype: mx.Dtype | None = None, routed_experts: bool = True) -> Model:
    """routed_experts=False loads the trunk only: routed-expert tensors are never read and each
    MoE layer is left without `switch_mlp` for experts.attach_experts to provide."""
    directory = Path(path)
    cfg = ModelConfig.load(directory)
    model = Model(cfg)
    weights = read_weights(directory)
    if not routed_experts:
        from .experts.store import is_routed_expert

        weights = {k: v for k, v in weights.items() if not is_routed_expert(k)}  # lazy arrays: never read
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.pop("switch_mlp")
    if any(k.endswith("_scale_inv") for k in weights):
        raise EdgeDSError(f"{directory}: FP8 checkpoint; convert it first (edge-ds convert {directory} OUT)")
    weights = model.sanitize(weights)

    def quantize_predicate(p: str, m: nn.Module):
        if f"{p}.scales" not in weights:
            return False
        q = quantization_of(cfg, p)
        if q is None:
            raise EdgeDSError(f"{directory}/config.json: '{p}' is quantized but config.json has no 'quantization'")
        return q

    nn.quantize(model, class_predicate=quantize_predicate)

    dtype = dtype or compute_dtype()
    model.dtype = dtype
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith("e_score_correction_bias"):
            weights[k] = v.astype(dtype)
        elif k.endswith("e_score_correction_bias"):
            weights[k] = v.astype(mx.float32)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise EdgeDSError(f"{directory}: weights do not match config.json ({e})") from None
    mx.eval(model.parameters())
    return model
