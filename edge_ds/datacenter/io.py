"""Checkpoints as torch tensors: read any DeepSeek safetensors checkpoint by tensor name, and write
one in DeepSeek's FP8 layout (e4m3 + 128x128 `weight_scale_inv`) from a float one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import EdgeDSError
from .fp8 import BLOCK

INDEX = "model.safetensors.index.json"


def _to_torch(a: np.ndarray) -> "torch.Tensor":
    """A checkpoint array (numpy, ml_dtypes for BF16/FP8) as a torch tensor of the same dtype."""
    name = a.dtype.name
    a = np.ascontiguousarray(a)
    if name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if name == "float8_e4m3fn":
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    if name == "float8_e8m0fnu":  # power-of-two block scales (DeepSeek-V4's ue8m0)
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e8m0fnu)
    return torch.from_numpy(a)


class TorchCheckpoint:
    """A checkpoint's tensors as torch tensors, by name: edge-ds's reader (it checks headers and
    shards, and resolves names through model.safetensors.index.json) where ml_dtypes is
    installed, else safetensors' own torch reader (a GPU image may have torch but no ml_dtypes)."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            from ..checkpoint import Checkpoint  # needs ml_dtypes
        except ImportError:
            Checkpoint = None
        if Checkpoint is not None:
            self._ckpt = Checkpoint(directory)
            self._names = set(self._ckpt.names())
            return
        from safetensors import safe_open

        self._ckpt = None
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise EdgeDSError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted({directory / Path(f).name for f in weight_map.values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise EdgeDSError(f"{directory}: no *.safetensors files")
        self._where: dict[str, Any] = {}
        for path in files:
            if not path.is_file():
                raise EdgeDSError(f"{index}: shard {path.name} is missing from {directory}")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise EdgeDSError(f"{path}: not a readable safetensors file ({e})") from None
            for name in handle.keys():
                self._where[name] = handle
        self._names = set(self._where)

    def names(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str) -> "torch.Tensor":
        if name not in self._names:
            raise EdgeDSError(f"{self.directory}: tensor {name!r} is missing (the checkpoint does not match "
                              "config.json)")
        if self._ckpt is not None:
            return _to_torch(self._ckpt.read(name))
        return self._where[name].get_tensor(name)

    def is_fp8(self, name: str) -> bool:
        if name not in self._names:
            return False
        if self._ckpt is not None:
            return str(self._ckpt.info(name).dtype) == "F8_E4M3"
        return self._where[name].get_slice(name).get_dtype() == "F8_E4M3"




# Files of a model directory that travel with its weights (never code: no *.py).
COMPANIONS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tiktoken.model", "generation_config.json",
              "special_tokens_map.json", "chat_template.jinja", "LICENSE")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}


def is_fp8_target(name: str, shape: tuple) -> bool:
    """DeepSeek's FP8 tensors: the 2-D projection weights of the decoder layers (attention, dense
    MLP, shared and routed experts, MTP), V3.2's indexer wq_b and wk, and V4's indexer q_b_proj.
    Not embeddings, head, norms, the router (`mlp.gate`) or its correction bias, the indexer's
    weights_proj, nor V4's compressor and indexer kv_proj/gate_proj (BF16 in DeepSeek's V4
    release, as transformers' V4 `_keep_in_fp32_modules` notes)."""
    if ".compressor." in name and not name.endswith(".indexer.q_b_proj.weight"):
        return False
    return (len(shape) == 2 and name.startswith("model.layers.")
            and name.endswith(("_proj.weight", "_proj_with_mqa.weight", ".indexer.wq_b.weight", ".indexer.wk.weight"))
            and not name.endswith("weights_proj.weight"))


def _scale_fmt(cfg: dict, scale_fmt: str | None) -> str | None:
    """"auto": DeepSeek-V4's power-of-two (ue8m0) block scales for deepseek_v4, float32 ones otherwise."""
    if scale_fmt == "auto":
        return "ue8m0" if cfg.get("model_type") == "deepseek_v4" else None
    if scale_fmt not in (None, "ue8m0"):
        raise EdgeDSError(f"scale_fmt must be 'auto', null or 'ue8m0', got {scale_fmt!r}")
    return scale_fmt


def write_fp8_checkpoint(src: str | Path, dst: str | Path, shard_bytes: int = 2 * 10**9,
                         progress: Callable[[int, int, str], None] | None = None,
                         scale_fmt: str | None = "auto") -> Path:
    """A float Hugging Face checkpoint in `src` -> `dst` in DeepSeek's FP8 layout: e4m3 projection
    weights with `weight_scale_inv` [ceil(out/128), ceil(in/128)] (see weight_quant), everything
    else bfloat16 except the tensors DeepSeek keeps in float32 (the router's correction bias, V4's
    sinks, pooling biases and hyper-connections: layout.keeps_float32) and integer tables (V4's
    tid2eid), kept as they are; shards of about `shard_bytes` with model.safetensors.index.json;
    config.json with DeepSeek's quantization_config. scale_fmt "auto" (the default): V4 checkpoints
    get "ue8m0", as DeepSeek's V4 release: power-of-two scales stored as F8_E8M0, and
    `scale_fmt: ue8m0` in the quantization_config (activation scales round up to powers of two
    too); other families float32 scales. Written to a hidden directory renamed at the end."""
    from safetensors.torch import save_file

    from ..layout import keeps_float32
    from .fp8 import weight_quant

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise EdgeDSError(f"{dst}: already exists; give a new directory")
    try:
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgeDSError(f"{src / 'config.json'}: cannot read ({e})") from None
    if cfg.get("quantization") or cfg.get("quantization_config"):
        raise EdgeDSError(f"{src / 'config.json'}: already quantized; the FP8 build is written from float weights")
    scale_fmt = _scale_fmt(cfg, scale_fmt)
    ckpt = TorchCheckpoint(src)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        names = ckpt.names()
        for i, name in enumerate(names):
            t = ckpt.read(name)
            if is_fp8_target(name, tuple(t.shape)):
                q, s = weight_quant(t, name, scale_fmt)
                out = {name: q, name + "_scale_inv": s.to(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else s}
            elif not t.is_floating_point():
                out = {name: t}
            elif name.endswith("e_score_correction_bias") or keeps_float32(name):
                out = {name: t.to(torch.float32)}
            else:
                out = {name: t.to(torch.bfloat16)}
            nbytes = sum(v.numel() * v.element_size() for v in out.values())
            if size and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1].update(out)
            size += nbytes
            if progress:
                progress(i + 1, len(names), name)
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map = {}
        for f, part in zip(files, shards):
            save_file({k: v.contiguous() for k, v in part.items()}, str(tmp / f), metadata={"format": "pt"})
            weight_map.update({k: f for k in part})
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=1))
        cfg = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
        cfg.update(quantization_config=dict(FP8_CONFIG, scale_fmt=scale_fmt) if scale_fmt else FP8_CONFIG,
                   torch_dtype="bfloat16")
        cfg.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in COMPANIONS:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
