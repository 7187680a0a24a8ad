"""`edge-ds export-onnx`: Hugging Face DeepSeek checkpoint (BF16/F32, or FP8 with 128x128 block
scales) or an edge-ds / mlx-lm converted directory -> a directory onnxruntime runs: model.onnx
+ model.onnx.data (the weights), config.json, the tokenizer files and onnx.json (inputs,
outputs, quantization).

Tensors are read one at a time and quantized at once, so the peak is the quantized model plus
one float tensor. Everything is written into a hidden temporary directory renamed to DST at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx

from edge_ds import layout
from edge_ds.checkpoint import Checkpoint
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError, OptionError

from ..staging import Progress, check_paths, staged_output
from .graph import build_model, io_names
from .quant import BlockQuant
from .sources import open_reader

MANIFEST = layout.ONNX_MANIFEST
MODEL = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"


def not_exportable(cfg: ModelConfig) -> str | None:
    """Why the ONNX graph cannot express this model, or None when it can."""
    if cfg.attention_bias:
        return "attention_bias is true, but the ONNX graph has no attention biases, so this model cannot be exported to ONNX"
    if cfg.model_type == "deepseek_v4":
        return ("model_type deepseek_v4 (compressed attention, hyper-connections, hash-routed experts) has no ONNX "
                "graph; run it with the mlx backend (`edge-ds convert` makes its MLX directory)")
    if cfg.sparse_attention:
        return ("model_type deepseek_v32 uses DeepSeek sparse attention (a Lightning Indexer choosing index_topk rows "
                "per query), which the ONNX graph does not have yet; run this model with the mlx backend")
    return None


def add_onnx_export(src: str | Path, dst: str | Path, progress: Progress | None = None, **options) -> Path:
    """Adds an ONNX export of SRC to DST, a model directory converted from it (its config and tokenizer
    serve both; converters.mlx.convert calls this on its staging directory): model.onnx (and its
    data) first, onnx.json last, so the onnx backend sees the export only once it is whole.
    options: export_onnx's."""
    src, dst = Path(src), Path(dst)
    part = dst / f".onnx-export-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    try:
        export_onnx(src, part, progress=progress, **options)
        for name in (MODEL, EXTERNAL_DATA, MANIFEST):  # the manifest last
            if (part / name).is_file():
                (part / name).replace(dst / name)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return dst


def export_onnx(src: str | Path, dst: str | Path, bits: int = 4, block_size: int = 32, accuracy_level: int = 4,
                progress: Progress | None = None) -> Path:
    """Exports SRC into a new directory DST; SRC is only read."""
    src, dst = Path(src), Path(dst)
    if bits not in (4, 8):
        raise OptionError("bits", f"{{option}} must be 4 or 8, got {bits}")
    if block_size not in (32, 64, 128):
        raise OptionError("block_size", f"{{option}} must be 32, 64 or 128, got {block_size}")
    if accuracy_level not in (0, 4):
        raise OptionError("accuracy_level", f"{{option}} must be 0 or 4, got {accuracy_level}")
    check_paths(src, dst)
    cfg = ModelConfig.load(src)
    why_not = not_exportable(cfg)
    if why_not:
        raise EdgeDSError(f"{src}/{layout.CONFIG_FILE}: {why_not}")
    quant = BlockQuant(bits, block_size, accuracy_level)

    ckpt = Checkpoint(src)
    try:
        with staged_output(src, dst) as tmp:
            reader = open_reader(cfg, ckpt, progress)
            model = build_model(cfg, reader, quant)
            if progress:
                progress(reader.total, reader.total, "writing")
            # The weights go to their own file, which onnxruntime maps instead of parsing them out of
            # the protobuf: on the ~450M benchmark model, peak memory 441 MB instead of 649, load 0.7 s
            # instead of 1.4 (and protobuf caps a file at 2 GB).
            onnx.save_model(model, str(tmp / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=EXTERNAL_DATA, size_threshold=1024)
            shutil.copymode(tmp / MODEL, tmp / EXTERNAL_DATA)  # onnx creates it readable by its owner only
            onnx.checker.check_model(str(tmp / MODEL))
            cfg.quantization = None  # an MLX source's block: the ONNX weights carry their own
            (tmp / layout.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
            manifest = {"format": "edge-ds-onnx-v1", "model_type": cfg.model_type, "file": MODEL,
                        "external_data": EXTERNAL_DATA,
                        "quantization": {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
                                         "symmetric": True},
                        "num_layers": cfg.num_hidden_layers, "latent_dim": cfg.latent_dim,
                        "kv_lora_rank": cfg.kv_lora_rank, "vocab_size": cfg.vocab_size,
                        "max_position_embeddings": cfg.max_position_embeddings, **io_names(cfg)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    finally:
        ckpt.close()
    return dst
