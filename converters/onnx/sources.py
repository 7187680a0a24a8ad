"""Readers that give the exporter float32 tensors under Hugging Face names, from either a
Hugging Face checkpoint (BF16/F32, or FP8 with 128x128 block scales) or an edge-ds / mlx-lm
converted directory (affine or mx quantized weights, experts stacked as switch_mlp, kv_b_proj
split into embed_q/unembed_out for deepseek_v3). edge_ds/layout.py owns the names of both layouts."""

from __future__ import annotations

import numpy as np

from edge_ds import layout
from edge_ds.checkpoint import Checkpoint, require_finite
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError

from ..fp8 import read_float32
from ..staging import Progress, missing_tensor


class TensorReader:
    """name -> float32 array in the Hugging Face layout, shape checked against config.json,
    NaN/Inf refused. Subclasses say how a name is found in their directory."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None):
        self.cfg, self.ckpt, self.progress = cfg, ckpt, progress
        self.expected = layout.hf_shapes(cfg)
        self.total = len(self.expected)
        self.done = 0

    def __call__(self, name: str) -> np.ndarray:
        w, where = self.fetch(name)
        want = self.expected.get(name)
        if want is not None and tuple(w.shape) != want:
            raise EdgeDSError(f"{where}: tensor '{name}' has shape {list(w.shape)}, config.json implies {list(want)}")
        require_finite(w, where, f"tensor '{name}'")
        self.done += 1
        if self.progress:
            layer = layout.layer_of(name)
            self.progress(min(self.done, self.total), self.total, name if layer is None else f"layer {layer}")
        return w

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        raise NotImplementedError


class HFReader(TensorReader):
    """FP8 weights are dequantized with the fixed 128x128 rule (never inferred from shapes)."""

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        if name not in self.ckpt:
            raise missing_tensor(self.ckpt, name)
        return read_float32(self.ckpt, name), str(self.ckpt.info(name).path)


class MLXReader(TensorReader):
    """An mlx-lm layout directory: quantized weights are dequantized with MLX itself (the
    exporter then re-quantizes them to onnxruntime's symmetric blocks)."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None):
        super().__init__(cfg, ckpt, progress)
        self.names = set(ckpt.names())
        self._stack: tuple[str, np.ndarray] | None = None  # the last switch_mlp stack read

    def fetch(self, name: str) -> tuple[np.ndarray, str]:
        expert = layout.parse_expert(name)
        if expert is not None:
            layer, e, proj, part = expert
            stacked = layout.stacked_name(layer, proj, part)
            if self._stack is None or self._stack[0] != stacked:
                self._stack = stacked, self.dense(stacked)
            return self._stack[1][e], str(self.ckpt.info(stacked).path)
        if name.endswith(".self_attn.kv_b_proj.weight") and name not in self.ckpt:
            embed_q, unembed_out = (n + ".weight" for n in
                                    layout.split_kv_b_names(name.removesuffix(".kv_b_proj.weight")))
            w_uk = self.dense(embed_q).transpose(0, 2, 1)  # embed_q is W_UK transposed: back to its rows
            w = layout.merge_kv_b(w_uk, self.dense(unembed_out))
            return w, str(self.ckpt.info(embed_q).path)
        return self.dense(name), str(self.ckpt.info(name).path)

    def dense(self, name: str) -> np.ndarray:
        import mlx.core as mx

        if name not in self.ckpt:
            raise missing_tensor(self.ckpt, name)
        w = self.ckpt.read(name)
        if not layout.is_quantized(name, self.names):
            return np.asarray(w).astype(np.float32, copy=False)
        module = name.removesuffix(".weight")
        q = layout.quantization_for(self.cfg, module)
        if q is None:
            raise EdgeDSError(f"{self.ckpt.directory}/{layout.CONFIG_FILE}: no quantization parameters for "
                              f"'{name}', which is stored quantized")
        biases = self.ckpt.read(module + ".biases") if module + ".biases" in self.ckpt else None
        out = mx.dequantize(mx.array(w), mx.array(self.ckpt.read(module + ".scales")),
                            None if biases is None else mx.array(biases.astype(np.float32)),
                            group_size=q["group_size"], bits=q["bits"], mode=q["mode"])
        return np.array(out.astype(mx.float32))


def open_reader(cfg: ModelConfig, ckpt: Checkpoint, progress: Progress | None = None) -> TensorReader:
    """An mlx-lm layout directory (quantization block or switch_mlp stacks) or a Hugging Face one."""
    return (MLXReader if layout.is_mlx_layout(cfg, ckpt) else HFReader)(cfg, ckpt, progress)
