"""edge-ds' onnxruntime backend against llama.cpp's llama-bench, in the same run.

    python benchmarks/onnx_bench.py --llama-bench PATH --gguf MODEL.gguf [--out bench_out]
                                    [-p 128] [-g 64] [-n 3] [-t 2] [--block-size 32]

Exports the ~450M DeepSeek-V3-shaped benchmark model (bench_model.py; built once into
OUT/hf) to ONNX at 4 bits with int8 activations (accuracy level 4), runs `edge-ds bench
--backend onnx` in a fresh process, then `llama-bench -p P -n G -t T` on the GGUF you give
(the same checkpoint converted to Q4_0 with llama.cpp's convert_hf_to_gguf.py and
llama-quantize; this script never builds or downloads llama.cpp), and prints a markdown table
with the ratios (also saved as OUT/onnx_bench_result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build  # noqa: E402


def run(cmd: list[str], env: dict | None = None) -> str:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def llama_bench(binary: str, gguf: str, prompt: int, gen: int, trials: int, threads: int) -> dict:
    """llama-bench's average tok/s for the prompt (pp) and generation (tg) tests."""
    rows = json.loads(run([binary, "-m", gguf, "-p", str(prompt), "-n", str(gen), "-t", str(threads),
                           "-r", str(trials), "-o", "json"]))
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return {"prompt_tps": pp["avg_ts"], "generation_tps": tg["avg_ts"], "prompt_tps_stddev": pp["stddev_ts"],
            "generation_tps_stddev": tg["stddev_ts"], "model_type": pp.get("model_type"),
            "build_commit": pp.get("build_commit"), "cpu": pp.get("cpu_info")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="Path to a llama-bench binary you built.")
    ap.add_argument("--gguf", required=True, help="The benchmark model as a Q4_0 GGUF.")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=64)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    hf = build(out)
    onnx_dir = out / f"onnx-q4-b{args.block_size}"
    if not onnx_dir.exists():
        run([sys.executable, "-m", "edge_ds.cli", "export-onnx", str(hf), str(onnx_dir), "--bits", "4", "--block-size", str(args.block_size),
             "--accuracy-level", "4"])

    env = dict(os.environ, EDGE_DS_THREADS=str(args.threads))
    ours = json.loads(run([sys.executable, "-m", "edge_ds.cli", "bench", "--model", str(onnx_dir), "--backend", "onnx", "-p", str(args.p),
                           "-g", str(args.g), "-n", str(args.n), "--json"], env=env))
    theirs = llama_bench(args.llama_bench, args.gguf, args.p, args.g, args.n, args.threads)
    result = {"edge_ds_onnx": ours, "llama_cpp_q4_0": theirs,
              "prompt_ratio": ours["prompt_tps"] / theirs["prompt_tps"],
              "generation_ratio": ours["generation_tps"] / theirs["generation_tps"],
              "threads": args.threads, "block_size": args.block_size}
    (out / "onnx_bench_result.json").write_text(json.dumps(result, indent=2))
    print(f"| runtime (4-bit, -p {args.p} -g {args.g}, {args.threads} threads) | prompt tok/s | decode tok/s |")
    print("|---|---|---|")
    print(f"| llama.cpp Q4_0 (llama-bench, mean of {args.n}) | {theirs['prompt_tps']:.1f} | "
          f"{theirs['generation_tps']:.1f} |")
    print(f"| edge-ds onnx (block {args.block_size}, int8 activations, median of {args.n}) | "
          f"{ours['prompt_tps']:.1f} | {ours['generation_tps']:.1f} |")
    print(f"| ratio edge-ds / llama.cpp | {result['prompt_ratio']:.2f}x | {result['generation_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
