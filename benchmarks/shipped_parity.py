"""`edge-ds parity` on the shipped model, with builds made here from its 4-bit weights.

    python benchmarks/shipped_parity.py [--windows 8] [--window 128] [--keep DIR]

`edge-ds parity` with no arguments measures the shipped builds against the shipped FP8 build of
the trained float weights (Package.resources/edge-ds-tiny-fp8). The float weights themselves are
not shipped (82 MB; recipe/make.py builds them in a scratch directory), so the builds here, which
separate the runtimes from the quantization, start from the shipped 4-bit weights, dequantized
exactly (mx.dequantize) into a float32 Hugging Face checkpoint ("float-of-4bit"), then written
in DeepSeek's FP8 layout by edge_ds.datacenter.write_fp8_checkpoint ("fp8-of-4bit"). So:
  - torch float32 on float-of-4bit against the MLX 4-bit build: the same weights on two
    runtimes (transformers' modules against edge-ds's MLX model): only arithmetic differs;
  - the ONNX export of float-of-4bit (4-bit, block 32, int8 activations: `edge-ds export-onnx`
    defaults) re-quantizes the 4-bit values to another grid;
  - the FP8 reference against the MLX 4-bit build: FP8 numerics (e4m3 weights re-rounded from
    the 4-bit values, e4m3 activations) against the 4-bit runtime, NOT the 4-bit quantization
    loss of the trained model (that needs the float weights: README, recipe).
Prints the parity table and the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def mlx_to_hf_float(src: Path, dst: Path) -> Path:
    """An mlx-lm directory (quantized or not) -> a float32 Hugging Face checkpoint of the same
    weights: dequantized with mx.dequantize, routed experts unstacked, embed_q/unembed_out merged
    back into kv_b_proj."""
    import mlx.core as mx
    import numpy as np
    from safetensors.numpy import save_file

    from edge_ds.config import ModelConfig
    from edge_ds.layout import merge_kv_b, quantization_for

    cfg = ModelConfig.load(src)
    arrays: dict[str, mx.array] = {}
    for f in sorted(src.glob("model*.safetensors")):
        arrays.update(mx.load(str(f)))
    out: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        if name.endswith((".scales", ".biases")):
            continue
        module, _, leaf = name.rpartition(".")
        w = arrays[name]
        if f"{module}.scales" in arrays:
            q = quantization_for(cfg, module) or cfg.quantization
            w = mx.dequantize(w, arrays[f"{module}.scales"], arrays.get(f"{module}.biases"),
                              group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
        out[name] = np.array(w.astype(mx.float32))
    hf: dict[str, np.ndarray] = {}
    for name, a in out.items():
        if ".mlp.switch_mlp." in name:
            prefix, rest = name.split(".mlp.switch_mlp.")
            proj = rest.split(".")[0]
            for e in range(a.shape[0]):
                hf[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = np.ascontiguousarray(a[e])
        elif name.endswith(".self_attn.embed_q.weight"):
            attn = name.removesuffix(".embed_q.weight")
            w_uk_rows = a.transpose(0, 2, 1)  # embed_q [H, kv_lora, nope] is W_UK transposed
            hf[f"{attn}.kv_b_proj.weight"] = np.ascontiguousarray(merge_kv_b(w_uk_rows, out[f"{attn}.unembed_out.weight"]))
        elif name.endswith(".self_attn.unembed_out.weight"):
            continue
        else:
            hf[name] = np.ascontiguousarray(a)
    dst.mkdir(parents=True)
    save_file(hf, str(dst / "model.safetensors"), metadata={"format": "pt"})
    raw = {k: v for k, v in cfg.raw.items() if k not in ("quantization", "quantization_config")}
    (dst / "config.json").write_text(json.dumps(dict(raw, torch_dtype="float32"), indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--keep", type=Path, default=None, help="write the builds here (a new directory) and keep them")
    args = ap.parse_args()

    import edge_ds
    from edge_ds.datacenter import write_fp8_checkpoint
    from edge_ds.parity import default_text_path, format_table, parity
    from edge_ds.resources import default_model_path

    shipped = default_model_path()
    work = args.keep or Path(tempfile.mkdtemp(prefix="edge-ds-parity-"))
    t0 = time.perf_counter()
    float_dir = mlx_to_hf_float(shipped, work / "float-of-4bit")
    fp8_dir = write_fp8_checkpoint(float_dir, work / "fp8-of-4bit")
    from converters.onnx import export_onnx

    onnx_dir = Path(export_onnx(str(float_dir), str(work / "onnx-of-4bit"), progress=None))  # 4-bit, block 32
    built = time.perf_counter() - t0
    text = default_text_path().read_text(encoding="utf-8")
    t1 = time.perf_counter()
    ref = edge_ds.load(fp8_dir, backend="torch", device="cpu", gemm="fp8", dtype="bfloat16")
    cands = {
        f"mlx:{shipped}": edge_ds.load(shipped, backend="mlx"),
        f"onnx:{onnx_dir}": edge_ds.load(onnx_dir, backend="onnx"),
        f"torch,dtype=float32:{float_dir}": edge_ds.load(float_dir, backend="torch", device="cpu", dtype="float32"),
        f"torch,gemm=bf16:{fp8_dir}": edge_ds.load(fp8_dir, backend="torch", device="cpu", gemm="bf16"),
    }
    report = parity(ref, list(cands.values()), text, args.window, args.windows, labels=list(cands),
                    text_name=str(default_text_path()))
    print(format_table(report))
    print(f"\nbuilds {built:.1f} s, parity {time.perf_counter() - t1:.1f} s")
    print(json.dumps(report.to_dict(), indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
