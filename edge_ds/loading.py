"""Build an MLX model from a model directory (mlx-lm layout, or an unconverted BF16/F32 HF dir).

The steps, in order: read config.json; pick the module layout the checkpoint needs (W_UK as
kv_b_proj rows or as mlx-lm's embed_q: models.build); read the main model's tensors
(lazily: a tensor left out is never read); rename them to module names (Model.sanitize);
swap in quantized modules where the checkpoint holds scales; cast and load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ml_dtypes
import mlx.core as mx
import numpy as np
import mlx.nn as nn

from . import layout
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import EdgeDSError
from . import models
from .models.moe import MoE, SwitchGLU


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


def read_expert_rows(directory: Path, cfg: ModelConfig, experts: Sequence[int], dtype: mx.Dtype,
                     counter: list[int] | None = None) -> dict[str, mx.array]:
    """Only the routed experts `experts` (global ids) of every MoE layer, read by offset with
    experts.ExpertStore (one pread per expert and tensor, stacked or per-expert checkpoints):
    stacked switch_mlp name -> [len(experts), ...] (floats in `dtype`). Adds the bytes read to
    counter[0]."""
    from .experts.store import ExpertStore  # the store imports this package's config; keep it lazy

    store = ExpertStore(directory, cfg, dtype)
    out: dict[str, mx.array] = {}
    try:
        for l in store.layers:
            tensors = store.tensors[l]
            stacks = {key: np.empty((len(experts), *t.shape), t.dtype) for key, t in tensors.items()}
            store.read([(l, e, {key: a[i] for key, a in stacks.items()}) for i, e in enumerate(experts)])
            if counter is not None:
                counter[0] += len(experts) * sum(t.nbytes for t in tensors.values())
            for key, a in stacks.items():
                proj, kind = key.split(".")
                if a.dtype == np.dtype(ml_dtypes.bfloat16):  # MLX takes bfloat16 through its bits
                    out[layout.stacked_name(l, proj, kind)] = mx.array(a.view(np.uint16)).view(mx.bfloat16)
                else:
                    out[layout.stacked_name(l, proj, kind)] = mx.array(a)
    finally:
        store.close()
    return out


def stage_keep(cfg: ModelConfig, lo: int, hi: int):
    """keep(name) for a pipeline stage holding decoder layers [lo, hi): its layers' tensors, the
    embedding on the first stage (and on the last when the head is tied to it), the final norm and
    head on the last."""
    first, last = lo == 0, hi == cfg.num_hidden_layers

    def keep(name: str) -> bool:
        layer = layout.layer_of(name)
        if layer is not None:
            return lo <= layer < hi
        if name.startswith("model.embed_tokens."):
            return first or (last and cfg.tie_word_embeddings)
        return last  # model.norm, lm_head

    return keep


def prune_to_stage(model: nn.Module, cfg: ModelConfig, lo: int, hi: int) -> None:
    """Empties what stage_keep leaves unread: decoder layers outside [lo, hi), the embedding, the
    final norm and the head where the stage has no use for them."""
    keep = stage_keep(cfg, lo, hi)
    for i in range(len(model.layers)):
        if not lo <= i < hi:
            model.layers[i] = nn.Module()
    if not keep("model.embed_tokens.weight"):
        model.model.pop("embed_tokens")
    if not keep("model.norm.weight"):
        model.model.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")


def load_model(path: str | Path, dtype: mx.Dtype | None = None, routed_experts: bool = True,
               expert_ids: Sequence[int] | None = None, counter: list[int] | None = None,
               layers: tuple[int, int] | None = None, shard=None) -> nn.Module:
    """routed_experts=False loads the trunk only: routed-expert tensors are never read and each
    MoE layer is left without `switch_mlp`, for experts.attach_experts to provide.

    expert_ids (an expert-parallel rank's share, see edge_ds.parallel) loads only those routed
    experts, by offset reads: each MoE layer's switch_mlp holds len(expert_ids) experts, local id
    i being global expert expert_ids[i]; counter[0] grows by the expert bytes read.

    layers=(lo, hi) (a pipeline stage, see edge_ds.parallel.pipeline) reads only decoder layers
    [lo, hi) and the embedding/head that stage needs (stage_keep); the other layers are left as
    empty modules, so they hold no memory.

    shard (a tensor-parallel rank's reader, edge_ds.parallel.slices.SliceReader) reads instead:
    shard.read(directory, cfg) gives this rank's slice of every tensor, and the model is built
    from shard.config(cfg) (this rank's heads and intermediate sizes)."""
    directory = Path(path)
    cfg = ModelConfig.load(directory)
    sharded = expert_ids is not None
    keep = (lambda name: True) if routed_experts and not sharded else \
        (lambda name: not layout.is_routed_expert(name))
    if layers is not None:
        base, stage = keep, stage_keep(cfg, *layers)
        keep = lambda name: base(name) and stage(name)  # noqa: E731
    weights = read_weights(directory, keep) if shard is None else shard.read(directory, cfg)
    if shard is not None:
        cfg = shard.config(cfg)
    if any(layout.is_fp8_scale(k) for k in weights):
        raise EdgeDSError(f"{directory}: an FP8 checkpoint; convert it to MLX weights first (edge-ds convert)")
    model = models.build(cfg, weights)
    if sharded:
        weights.update(read_expert_rows(directory, cfg, list(expert_ids), dtype or compute_dtype(), counter))
    if layers is not None:
        prune_to_stage(model, cfg, *layers)
    for layer in model.layers:
        if not isinstance(getattr(layer, "mlp", None), MoE):
            continue
        if not routed_experts:
            layer.mlp.pop("switch_mlp")
        elif sharded:
            old = layer.mlp.switch_mlp  # same shapes and swiglu limit, fewer experts
            layer.mlp.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, len(expert_ids), old.limit)
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
