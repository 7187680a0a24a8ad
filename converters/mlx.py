"""Hugging Face DeepSeek checkpoint (BF16/F32, or FP8 with 128x128 block scales) -> MLX model dir.

The output is the mlx-lm layout, so mlx-lm reads it and we read mlx-lm's: routed experts
stacked as switch_mlp, kv_b_proj split into embed_q/unembed_out for deepseek_v3 (kept for
deepseek_v2), a `quantization` block in config.json. The MTP module goes to mtp.safetensors,
which mlx-lm does not load.

Streaming: one decoder layer at a time, each tensor quantized as soon as it is read, so the
peak is about one layer at the output precision. Everything is written into a hidden
temporary directory that is renamed to DST only when all of it is done.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from edge_ds.checkpoint import Checkpoint
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError

from .fp8 import read_float32
from .staging import check_paths, staged_output

QUANT_PRESETS = {  # name -> (mode, bits, default group size)
    "4bit": ("affine", 4, 64),
    "8bit": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "mxfp8": ("mxfp8", 8, 32),
    "none": (None, None, None),
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
PROJS = ("gate_proj", "up_proj", "down_proj")

Progress = Callable[[int, int, str], None]


@dataclass
class Quant:
    mode: str | None
    bits: int | None
    group_size: int | None

    @classmethod
    def parse(cls, name: str, group_size: int | None) -> "Quant":
        if name not in QUANT_PRESETS:
            raise EdgeDSError(f"--quant must be one of {', '.join(QUANT_PRESETS)}, got {name!r}")
        mode, bits, default_gs = QUANT_PRESETS[name]
        if mode is None:
            return cls(None, None, None)
        gs = group_size or default_gs
        allowed = (32, 64, 128) if mode == "affine" else (32,)
        if gs not in allowed:
            raise EdgeDSError(f"--group-size for {name} must be one of {allowed}, got {gs}")
        return cls(mode, bits, gs)

    def block(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def convert(src: str | Path, dst: str | Path, quant: str = "4bit", group_size: int | None = None,
            dtype: str = "bfloat16", progress: Progress | None = None) -> Path:
    """Converts SRC into a new directory DST; SRC is only read."""
    src, dst = Path(src), Path(dst)
    q = Quant.parse(quant, group_size)
    if dtype not in DTYPES:
        raise EdgeDSError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_paths(src, dst)
    cfg = ModelConfig.load(src)
    ckpt = Checkpoint(src)
    units = _plan(cfg, ckpt)

    try:
        with staged_output(src, dst) as tmp:
            writer = _LayerWriter(cfg, ckpt, q, DTYPES[dtype])
            weight_map: dict[str, str] = {}
            total_size = 0
            main_units = [u for u in units if u[0] != "mtp"]
            for n, (kind, names) in enumerate(units):
                if progress:
                    progress(n, len(units), kind)
                arrays = writer.convert(names)
                if kind == "mtp":
                    fname = "mtp.safetensors"
                else:
                    fname = f"model-{n + 1:05d}-of-{len(main_units):05d}.safetensors"
                    weight_map.update({k: fname for k in arrays})
                    total_size += sum(a.nbytes for a in arrays.values())
                mx.save_safetensors(str(tmp / fname), arrays, metadata={"format": "mlx"})
                del arrays
            _check_complete(cfg, ckpt, weight_map)
            if progress:
                progress(len(units), len(units), "done")
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            out_cfg = cfg.to_dict()
            if q.mode is not None:
                out_cfg["quantization"] = q.block()
                out_cfg["quantization_config"] = q.block()
            out_cfg["torch_dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2))
    finally:
        ckpt.close()
    return dst


def _check_complete(cfg: ModelConfig, ckpt: Checkpoint, weight_map: dict[str, str]) -> None:
    expected = expected_shapes(cfg)
    for name in expected:
        if name.endswith("kv_b_proj.weight") and cfg.model_type != "deepseek_v2":
            continue
        if name not in weight_map:
            hf = re.sub(r"switch_mlp\.(\w+)\.weight", r"experts.0.\1.weight", name)
            raise EdgeDSError(f"{ckpt.directory}: tensor '{hf}' is missing from the checkpoint")


def _plan(cfg: ModelConfig, ckpt: Checkpoint) -> list[tuple[str, list[str]]]:
    """Groups tensor names into units written one at a time: trunk, each layer, the MTP module."""
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    n = cfg.num_hidden_layers
    layers: dict[int, list[str]] = {}
    trunk, mtp = [], []
    for name in ckpt.names():
        if name.endswith("_scale_inv") or "rotary_emb.inv_freq" in name:
            continue  # scales travel with their weight; inv_freq is recomputed
        m = layer_re.match(name)
        if m is None:
            trunk.append(name)
        elif int(m.group(1)) < n:
            layers.setdefault(int(m.group(1)), []).append(name)
        else:
            mtp.append(name)
    missing = [i for i in range(n) if i not in layers]
    if missing:
        raise EdgeDSError(f"{ckpt.directory}: no tensors for layer {missing[0]} (config.json has "
                          f"num_hidden_layers={n})")
    units = [("trunk", trunk)] + [(f"layer {i}", layers[i]) for i in range(n)]
    if mtp:
        units.append(("mtp", mtp))
    return units


class _LayerWriter:
    """Reads, dequantizes, checks, renames, quantizes the tensors of one unit."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, q: Quant, dtype: mx.Dtype):
        self.cfg, self.ckpt, self.q, self.dtype = cfg, ckpt, q, dtype
        self.expected = expected_shapes(cfg)

    def read_float(self, name: str) -> np.ndarray:
        info = self.ckpt.info(name)
        w = read_float32(self.ckpt, name)
        if not np.isfinite(w).all():
            bad = int((~np.isfinite(w)).sum())
            raise EdgeDSError(f"{info.path}: tensor '{name}' has {bad} NaN/Inf values")
        return w

    def convert(self, names: list[str]) -> dict[str, mx.array]:
        cfg = self.cfg
        out: dict[str, mx.array] = {}
        experts: dict[str, dict[int, dict[str, mx.array]]] = {}
        expert_re = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
        for name in names:
            m = expert_re.match(name)
            w = self.read_float(name)
            if m:
                prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                target = f"{prefix}.mlp.switch_mlp.{proj}.weight"
                shape = self.expected.get(target)
                if shape is not None and w.shape != shape[1:]:
                    self._shape_error(name, w.shape, shape[1:])
                experts.setdefault(target, {})[e] = self._finish(target, w)
            elif name.endswith("self_attn.kv_b_proj.weight") and cfg.model_type != "deepseek_v2":
                self._check(name, w)
                out.update(self._split_kv_b(name, w))
            else:
                self._check(name, w)
                out.update(self._finish(name, w))
        for target, by_expert in experts.items():
            E = cfg.n_routed_experts
            missing = [e for e in range(E) if e not in by_expert]
            if missing:
                raise EdgeDSError(f"{self.ckpt.directory}: expert {missing[0]} of "
                                  f"'{target.replace('switch_mlp', 'experts.N')}' is missing")
            for key in by_expert[0]:  # weight, and scales/biases when quantized
                out[key] = mx.stack([by_expert[e][key] for e in range(E)])
        return out

    def _split_kv_b(self, name: str, w: np.ndarray) -> dict[str, mx.array]:
        """kv_b_proj [H*(nope+v), kv_lora] -> embed_q [H, kv_lora, nope] (W_UK^T), unembed_out [H, v, kv_lora]."""
        cfg = self.cfg
        w = w.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        base = name[: -len("kv_b_proj.weight")]
        wk = np.ascontiguousarray(w[:, : cfg.qk_nope_head_dim].transpose(0, 2, 1))
        wv = np.ascontiguousarray(w[:, cfg.qk_nope_head_dim:])
        return {**self._finish(base + "embed_q.weight", wk), **self._finish(base + "unembed_out.weight", wv)}

    def _check(self, name: str, w: np.ndarray) -> None:
        shape = self.expected.get(name)
        if shape is None:
            if re.match(rf"^model\.layers\.(\d+)\.", name) and int(name.split(".")[2]) >= self.cfg.num_hidden_layers:
                return  # MTP module: kept as is
            raise EdgeDSError(f"{self.ckpt.info(name).path}: unexpected tensor '{name}' for a "
                              f"{self.cfg.model_type} model with this config.json")
        if tuple(w.shape) != shape:
            self._shape_error(name, w.shape, shape)

    def _shape_error(self, name: str, got: tuple, want: tuple) -> None:
        raise EdgeDSError(f"{self.ckpt.info(name).path}: tensor '{name}' has shape {list(got)}, "
                          f"config.json implies {list(want)}")

    def _finish(self, name: str, w: np.ndarray) -> dict[str, mx.array]:
        """Quantizes the weights mlx-lm would quantize; casts everything else."""
        a = mx.array(w)
        base = name[: -len("weight")]
        if self.q.mode is not None and quantizable(name, w.shape, self.q.group_size):
            qw, scales, *biases = mx.quantize(a, self.q.group_size, self.q.bits, mode=self.q.mode)
            res = {name: qw, base + "scales": scales.astype(self.dtype) if self.q.mode == "affine" else scales}
            if biases:
                res[base + "biases"] = biases[0].astype(self.dtype)
            mx.eval(res)
            return res
        if name.endswith("e_score_correction_bias"):
            return {name: a.astype(mx.float32)}
        res = {name: a.astype(self.dtype)}
        mx.eval(res)
        return res


def quantizable(name: str, shape: tuple, group_size: int) -> bool:
    """mlx-lm's rule: Linear, Embedding, SwitchLinear, MultiLinear weights whose rows split into groups.

    The router (mlp.gate) and norms stay in floating point.
    """
    if not name.endswith(".weight") or len(shape) < 2 or shape[-1] % group_size:
        return False
    return not (name.endswith("mlp.gate.weight") or "norm" in name.rsplit(".", 2)[-2])


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Float parameter shapes in the output layout, keyed by checkpoint name (deepseek_v2 keeps kv_b_proj)."""
    from mlx.utils import tree_flatten

    from edge_ds.models.deepseek import Model

    shapes = {k: tuple(v.shape) for k, v in tree_flatten(Model(cfg).parameters())}  # lazy zeros: no memory
    if cfg.model_type == "deepseek_v2":
        H = cfg.num_attention_heads
        for i in range(cfg.num_hidden_layers):
            a = f"model.layers.{i}.self_attn"
            del shapes[f"{a}.embed_q.weight"], shapes[f"{a}.unembed_out.weight"]
            shapes[f"{a}.kv_b_proj.weight"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    else:
        # HF checkpoints carry kv_b_proj; the converter splits it.
        H = cfg.num_attention_heads
        for i in range(cfg.num_hidden_layers):
            shapes[f"model.layers.{i}.self_attn.kv_b_proj.weight"] = (
                H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    return shapes
