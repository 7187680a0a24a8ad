"""One command for the core benchmark: edge-ds against mlx-lm (float32 activations) in the same run.

    python benchmarks/run.py [--out bench_out] [-p 128] [-g 64] [-n 3]

Builds the ~450M DeepSeek-V3-shaped model (bench_model.py) once, converts it to 4 bits with
both tools, runs `edge-ds bench` and `mlx_lm.benchmark` in fresh processes, measures this
machine's memory bandwidth, and prints the ratios as a markdown table (also saved as JSON).
Needs the dev extra (mlx-lm, torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build  # noqa: E402


def memory_bandwidth_gbs(mb: int = 512, trials: int = 5) -> float:
    a = np.ones(mb * 1024 * 1024 // 8)
    a.sum()
    best = min(_timed(a.sum) for _ in range(trials))
    return a.nbytes / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bytes_per_token(model_dir: Path) -> int:
    """Weight bytes one decoded token reads: everything but the unrouted experts (and the embedding table,
    of which one row is read)."""
    from edge_ds.checkpoint import Checkpoint
    from edge_ds.config import ModelConfig

    cfg = ModelConfig.load(model_dir)
    ck = Checkpoint(model_dir)
    total = 0
    for name in ck.names():
        n = ck.info(name).nbytes
        if ".switch_mlp." in name:
            n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif name.startswith("model.embed_tokens."):
            n = n // cfg.vocab_size
        total += n
    return total


def run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=64)
    ap.add_argument("-n", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    hf = build(out)
    ours, theirs = out / "edge-q4", out / "mlxlm-q4-f32"
    if not ours.exists():
        run(["edge-ds", "convert", str(hf), str(ours), "--quant", "4bit"])
    if not theirs.exists():
        run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(theirs), "-q",
             "--dtype", "float32"])

    edge = json.loads(run(["edge-ds", "bench", "--model", str(ours), "-p", str(args.p), "-g", str(args.g),
                           "-n", str(args.n), "--json"]))
    text = run([sys.executable, "-m", "mlx_lm", "benchmark", "--model", str(theirs), "-p", str(args.p), "-g",
                str(args.g), "-n", str(args.n)])
    trials = re.findall(r"prompt_tps=([\d.]+), generation_tps=([\d.]+), peak_memory=([\d.]+)", text)
    if not trials:
        raise SystemExit(f"could not read mlx_lm.benchmark output:\n{text}")
    mlx_prompt = float(np.median([float(t[0]) for t in trials]))
    mlx_gen = float(np.median([float(t[1]) for t in trials]))
    mlx_peak = max(float(t[2]) for t in trials)

    bw = memory_bandwidth_gbs()
    per_tok = bytes_per_token(ours)
    bound = bw * 1e9 / per_tok
    result = {
        "edge_ds": edge, "mlx_lm_float32": {"prompt_tps": mlx_prompt, "generation_tps": mlx_gen,
                                            "peak_memory_gb": mlx_peak},
        "prompt_ratio": edge["prompt_tps"] / mlx_prompt, "generation_ratio": edge["generation_tps"] / mlx_gen,
        "memory_bandwidth_gbs": bw, "bytes_per_token": per_tok, "bandwidth_bound_tps": bound,
        "fraction_of_bound": edge["generation_tps"] / bound,
    }
    (out / "bench_result.json").write_text(json.dumps(result, indent=2))
    print(f"| runtime (4-bit, -p {args.p} -g {args.g}, median of {args.n}) | prompt tok/s | decode tok/s | peak GB |")
    print("|---|---|---|---|")
    print(f"| mlx-lm 0.32 (float32 activations) | {mlx_prompt:.1f} | {mlx_gen:.2f} | {mlx_peak:.2f} |")
    print(f"| edge-ds | {edge['prompt_tps']:.1f} | {edge['generation_tps']:.2f} | {edge['peak_memory_gb']:.2f} |")
    print(f"| ratio edge-ds / mlx-lm | {result['prompt_ratio']:.2f}x | {result['generation_ratio']:.2f}x | |")
    print(f"\nmemory bandwidth {bw:.1f} GB/s; {per_tok / 1e6:.1f} MB read per decoded token; bound "
          f"{bound:.0f} tok/s; edge-ds decode at {100 * result['fraction_of_bound']:.1f}% of it")


if __name__ == "__main__":
    main()
