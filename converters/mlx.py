"""Hugging Face DeepSeek checkpoint (BF16/F32, or FP8 with 128x128 block scales; DeepSeek-V4 also
in DeepSeek's release layout with packed FP4 experts) -> MLX model dir.

The output is the mlx-lm layout, so mlx-lm reads it and we read mlx-lm's: routed experts
stacked as switch_mlp, kv_b_proj split into embed_q/unembed_out for deepseek_v3 (kept for
deepseek_v2), a `quantization` block in config.json. The MTP module goes to mtp.safetensors,
which mlx-lm does not load. edge_ds/layout.py owns the names of both layouts.

DeepSeek-V4 (official_v4.py reads its layouts): packed FP4 routed experts become MLX mxfp4
weights bit for bit whatever --quant the rest gets (per-module entries in the quantization
block say so), tid2eid stays an integer table, the hyper-connection mixers, sinks, position
biases, norms and correction biases stay float32; DeepSeek's `mtp.*` tensors are copied as stored.

Streaming: one decoder layer at a time, each tensor quantized as soon as it is read, so the
peak is about one layer at the output precision. Everything is written into a hidden
temporary directory that is renamed to DST only when all of it is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from edge_ds import layout
from edge_ds.checkpoint import Checkpoint, require_finite
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError, OptionError

from . import official_v4
from .staging import Progress, Source, check_paths, missing_tensor, staged_output, write_raw_safetensors

QUANT_PRESETS = {  # name -> (mode, bits, default group size)
    "4bit": ("affine", 4, 64),
    "8bit": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "mxfp8": ("mxfp8", 8, 32),
    "none": (None, None, None),
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class Quant:
    mode: str | None
    bits: int | None
    group_size: int | None

    @classmethod
    def parse(cls, name: str, group_size: int | None) -> "Quant":
        if name not in QUANT_PRESETS:
            raise OptionError("quant", f"{{option}} must be one of {', '.join(QUANT_PRESETS)}, got {name!r}")
        mode, bits, default_gs = QUANT_PRESETS[name]
        if mode is None:
            return cls(None, None, None)
        gs = group_size or default_gs
        allowed = (32, 64, 128) if mode == "affine" else (32,)
        if gs not in allowed:
            raise OptionError("group_size", f"{{option}} for {name} must be one of {allowed}, got {gs}")
        return cls(mode, bits, gs)

    def block(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def convert(src: str | Path, dst: str | Path, quant: str = "4bit", group_size: int | None = None,
            dtype: str = "bfloat16", progress: Progress | None = None, onnx: bool = False) -> Path:
    """Converts SRC into a new directory DST; SRC is only read. onnx: also export SRC to onnxruntime
    into DST (converters.onnx.add_onnx_export), inside the same all-or-nothing write."""
    src, dst = Path(src), Path(dst)
    q = Quant.parse(quant, group_size)
    if dtype not in DTYPES:
        raise OptionError("dtype", f"{{option}} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_paths(src, dst)
    cfg = ModelConfig.load(src)
    ckpt = Checkpoint(src)
    if layout.is_mlx_layout(cfg, ckpt):
        ckpt.close()
        raise EdgeDSError(f"{src}: already an edge-ds / mlx-lm model (quantized, or experts stacked as switch_mlp); "
                          "load it as it is, or convert the original Hugging Face checkpoint")
    source = official_v4.V4Source(ckpt) if cfg.model_type == "deepseek_v4" else Source(ckpt)
    try:
        units = _plan(cfg, source)
        with staged_output(src, dst) as tmp:
            writer = _LayerWriter(cfg, source, q, DTYPES[dtype])
            weight_map: dict[str, str] = {}
            total_size = 0
            main_units = [u for u in units if u[0] != "mtp"]
            for n, (kind, names) in enumerate(units):
                if progress:
                    progress(n, len(units), kind)
                if kind == "mtp" and source.raw_names():
                    write_raw_safetensors(tmp / layout.MTP_FILE, ckpt, names)  # DeepSeek's MTP module, as stored
                    continue
                arrays = writer.convert(names)
                if kind == "mtp":
                    fname = layout.MTP_FILE
                else:
                    fname = f"model-{n + 1:05d}-of-{len(main_units):05d}.safetensors"
                    weight_map.update({k: fname for k in arrays})
                    total_size += sum(a.nbytes for a in arrays.values())
                mx.save_safetensors(str(tmp / fname), arrays, metadata={"format": "mlx"})
                del arrays
            if progress:
                progress(len(units), len(units), "done")
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / layout.INDEX_FILE).write_text(json.dumps(index, indent=2))
            out_cfg = cfg.to_dict()
            out_cfg.pop("expert_dtype", None)  # the release's expert format: converted away here
            block = _quantization_block(q, writer.native_mxfp4)
            if block is not None:
                out_cfg["quantization"] = block
                out_cfg["quantization_config"] = block
            out_cfg["torch_dtype"] = dtype
            (tmp / layout.CONFIG_FILE).write_text(json.dumps(out_cfg, indent=2))
            if onnx:
                from .onnx import add_onnx_export

                add_onnx_export(src, tmp, progress)
    finally:
        ckpt.close()
    return dst


def _quantization_block(q: Quant, native: list[str]) -> dict | None:
    """config.json's `quantization`: --quant's block, plus an entry per module stored as MX FP4
    already (V4's routed experts). With --quant none those are the only quantized modules, and
    the global block is theirs too (the loader quantizes only modules whose scales are there)."""
    if q.mode is None and not native:
        return None
    out = q.block() if q.mode is not None else dict(official_v4.MXFP4)
    out.update({path: dict(official_v4.MXFP4) for path in native})
    return out


def _plan(cfg: ModelConfig, ckpt: Source) -> list[tuple[str, list[str]]]:
    """Groups tensor names into units written one at a time: trunk, each layer, the MTP module.
    A checkpoint without every tensor config.json implies is refused here, before anything is written."""
    n = cfg.num_hidden_layers
    layers: dict[int, list[str]] = {}
    trunk, mtp = [], list(ckpt.raw_names())
    for name in ckpt.names():
        layer = layout.layer_of(name)
        if layer is None:
            trunk.append(name)
        elif layout.is_mtp(name, cfg):
            mtp.append(name)
        else:
            layers.setdefault(layer, []).append(name)
    missing = [i for i in range(n) if i not in layers]
    if missing:
        raise EdgeDSError(f"{ckpt.directory}: no tensors for layer {missing[0]} (config.json has "
                          f"num_hidden_layers={n})")
    for name in layout.hf_shapes(cfg):
        if name not in ckpt:
            raise missing_tensor(ckpt, name)
    units = [("trunk", trunk)] + [(f"layer {i}", layers[i]) for i in range(n)]
    if mtp:
        units.append(("mtp", mtp))
    return units


class _LayerWriter:
    """Reads, dequantizes, checks, renames, quantizes the tensors of one unit."""

    def __init__(self, cfg: ModelConfig, ckpt: Source, q: Quant, dtype: mx.Dtype):
        self.cfg, self.ckpt, self.q, self.dtype = cfg, ckpt, q, dtype
        self.shapes = layout.hf_shapes(cfg)
        self.native_mxfp4: list[str] = []  # modules written as the checkpoint's own MX FP4 bits

    def read_float(self, name: str) -> np.ndarray:
        w = self.ckpt.read_float32(name)
        require_finite(w, self.ckpt.path(name), self.ckpt.label(name))
        return w

    def convert(self, names: list[str]) -> dict[str, mx.array]:
        cfg = self.cfg
        out: dict[str, mx.array] = {}
        experts: dict[tuple[int, str, str], dict[int, dict[str, mx.array]]] = {}  # (layer, proj, part) -> e -> arrays
        for name in names:
            self._check(name, self.ckpt.shape(name))
            expert = layout.parse_expert(name)
            if expert is not None:
                layer, e, proj, part = expert
                stacked = layout.stacked_name(layer, proj, part)
                packed = self.ckpt.read_mxfp4(name)
                if packed is not None:  # FP4 as stored: its bits, not a re-quantization
                    base = stacked.removesuffix("weight")
                    experts.setdefault((layer, proj, part), {})[e] = {
                        stacked: mx.array(packed[0]), base + "scales": mx.array(packed[1])}
                    if e == 0:
                        self.native_mxfp4.append(base.removesuffix("."))
                else:
                    experts.setdefault((layer, proj, part), {})[e] = self._finish(stacked, self.read_float(name))
                continue
            if self.ckpt.is_integer(name):
                out[name] = self._integer_table(name)
                continue
            w = self.read_float(name)
            if name.endswith(".self_attn.kv_b_proj.weight") and cfg.model_type != "deepseek_v2":
                out.update(self._split_kv_b(name, w))
            else:
                out.update(self._finish(name, w))
        E = cfg.n_routed_experts
        for (layer, proj, part), by_expert in experts.items():
            missing = [e for e in range(E) if e not in by_expert]
            if missing:  # the MTP module's: _plan has checked the main model's experts
                raise missing_tensor(self.ckpt, layout.expert_name(layer, missing[0], proj, part))
            keys = set(by_expert[0])
            for e in range(E):
                if set(by_expert[e]) != keys:  # FP4 beside float experts in one layer: cannot stack
                    raise EdgeDSError(f"{self.ckpt.path(layout.expert_name(layer, e, proj, part))}: "
                                      f"{self.ckpt.label(layout.expert_name(layer, e, proj, part))} is stored "
                                      f"differently from expert 0 of layer {layer} (packed FP4 and not)")
            for key in by_expert[0]:  # weight, and scales/biases when quantized
                out[key] = mx.stack([by_expert[e][key] for e in range(E)])
            mx.eval(out)
        return out

    def _integer_table(self, name: str) -> mx.array:
        """V4's tid2eid [vocab, top_k]: expert ids per token, kept integer and checked in range."""
        t = self.ckpt.read_integer(name)
        E = self.cfg.n_routed_experts
        if t.size and (t.min() < 0 or t.max() >= E):
            bad = int(t.max()) if t.max() >= E else int(t.min())
            raise EdgeDSError(f"{self.ckpt.path(name)}: {self.ckpt.label(name)} holds expert id {bad}; "
                              f"config.json has n_routed_experts={E}")
        return mx.array(t.astype(np.int32) if t.dtype.kind == "u" else t)

    def _split_kv_b(self, name: str, w: np.ndarray) -> dict[str, mx.array]:
        """kv_b_proj -> mlx-lm's embed_q [H, kv_lora, nope] (W_UK transposed) and unembed_out [H, v, kv_lora]."""
        w_uk, w_uv = layout.split_kv_b(w, self.cfg)
        embed_q, unembed_out = layout.split_kv_b_names(name.removesuffix(".kv_b_proj.weight"))
        return {**self._finish(embed_q + ".weight", np.ascontiguousarray(w_uk.transpose(0, 2, 1))),
                **self._finish(unembed_out + ".weight", np.ascontiguousarray(w_uv))}

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        """`shape`: the tensor's logical shape (a packed FP4 weight's unpacked one)."""
        want = self.shapes.get(name)
        if want is None:
            if layout.is_mtp(name, self.cfg):
                return  # MTP module: kept as is
            raise EdgeDSError(f"{self.ckpt.path(name)}: unexpected {self.ckpt.label(name)} for a "
                              f"{self.cfg.model_type} model with this config.json")
        if tuple(shape) != want:
            raise EdgeDSError(f"{self.ckpt.path(name)}: {self.ckpt.label(name)} has shape {list(shape)}, "
                              f"config.json implies {list(want)}")

    def _finish(self, name: str, w: np.ndarray) -> dict[str, mx.array]:
        """Quantizes the weights mlx-lm would quantize; casts everything else."""
        a = mx.array(w)
        base = name[: -len("weight")]
        if self.q.mode is not None and layout.quantizable(name, w.shape, self.q.group_size):
            qw, scales, *biases = mx.quantize(a, self.q.group_size, self.q.bits, mode=self.q.mode)
            res = {name: qw, base + "scales": scales.astype(self.dtype) if self.q.mode == "affine" else scales}
            if biases:
                res[base + "biases"] = biases[0].astype(self.dtype)
            mx.eval(res)
            return res
        if name.endswith("e_score_correction_bias") or (
                self.cfg.model_type == "deepseek_v4" and official_v4.keeps_float32(name)):
            return {name: a.astype(mx.float32)}
        res = {name: a.astype(self.dtype)}
        mx.eval(res)
        return res
