"""What a Linux user gets by default against llama.cpp's llama-bench, in the same run.

    python benchmarks/onnx_bench.py --llama-bench PATH --gguf MODEL.gguf [--out bench_out]
                                    [-p 128] [-g 64] [-n 3] [-t 2] [--rounds 3] [-d 0]

Converts the ~450M DeepSeek-V3-shaped benchmark model (bench_model.py; built once into OUT/hf)
with `edge-ds convert SRC DST` (4-bit MLX weights and, off Apple Silicon, the ONNX export beside
them), then runs `edge-ds bench --model DST` with no backend flag (the backend it picks is
recorded) and `llama-bench -p P -n G -t T -r N` on the GGUF you give (with -d D, both run their
tests after D tokens of context: `edge-ds bench -d`, `llama-bench -d`) (the same checkpoint
converted to Q4_0 with llama.cpp's convert_hf_to_gguf.py and llama-quantize; this script never
builds or downloads llama.cpp), alternating the two for --rounds rounds so both see the same
machine. Prints a markdown table of the medians and each round's ratios (also saved as
OUT/onnx_bench_result.json, or OUT/onnx_bench_result_dD.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build  # noqa: E402


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """The command's stdout and its peak resident memory in GB (the child's own, from wait4)."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it with its resource usage (Unix)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode:
            err.seek(0)
            raise subprocess.CalledProcessError(proc.returncode, cmd, out, err.read())
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    return out, peak / 1e9


def llama_bench(binary: str, gguf: str, prompt: int, gen: int, trials: int, threads: int, depth: int = 0) -> dict:
    """llama-bench's average tok/s for the prompt (pp) and generation (tg) tests."""
    out, peak_gb = run([binary, "-m", gguf, "-p", str(prompt), "-n", str(gen), "-t", str(threads), "-r", str(trials),
                        "-o", "json"] + (["-d", str(depth)] if depth else []))
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return {"prompt_tps": pp["avg_ts"], "generation_tps": tg["avg_ts"], "prompt_tps_stddev": pp["stddev_ts"],
            "generation_tps_stddev": tg["stddev_ts"], "model_type": pp.get("model_type"), "peak_rss_gb": peak_gb,
            "build_commit": pp.get("build_commit"), "cpu": pp.get("cpu_info")}


def edge_ds_bench(model: Path, prompt: int, gen: int, trials: int, threads: int, depth: int = 0) -> dict:
    """`edge-ds bench --model DIR` as a user runs it: no backend flag."""
    env = dict(os.environ, EDGE_DS_THREADS=str(threads))
    out, peak_gb = run([sys.executable, "-m", "edge_ds", "bench", "--model", str(model), "-p", str(prompt),
                        "-g", str(gen), "-n", str(trials), "-d", str(depth), "--json"], env=env)
    return {**json.loads(out), "peak_rss_gb": peak_gb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="Path to a llama-bench binary you built.")
    ap.add_argument("--gguf", required=True, help="The benchmark model as a Q4_0 GGUF.")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=64)
    ap.add_argument("-n", type=int, default=3, help="Trials per run.")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="Alternating runs of each engine.")
    ap.add_argument("-d", "--depth", type=int, default=0, help="Tokens of context before each test (both engines).")
    args = ap.parse_args()
    out = Path(args.out)
    hf = build(out)
    converted = out / "converted"  # what `edge-ds convert SRC DST` writes with its defaults
    if not converted.exists():
        run([sys.executable, "-m", "edge_ds", "convert", str(hf), str(converted)])

    rounds = []
    for _ in range(args.rounds):
        ours = edge_ds_bench(converted, args.p, args.g, args.n, args.threads, args.depth)
        theirs = llama_bench(args.llama_bench, args.gguf, args.p, args.g, args.n, args.threads, args.depth)
        rounds.append({"edge_ds": ours, "llama_cpp_q4_0": theirs,
                       "prompt_ratio": ours["prompt_tps"] / theirs["prompt_tps"],
                       "generation_ratio": ours["generation_tps"] / theirs["generation_tps"]})

    def median(engine: str, key: str) -> float:
        return statistics.median(r[engine][key] for r in rounds)

    result = {"rounds": rounds, "threads": args.threads, "depth": args.depth, "backend": rounds[0]["edge_ds"]["backend"],
              "device": rounds[0]["edge_ds"]["device"],
              "median": {e: {k: median(e, k) for k in ("prompt_tps", "generation_tps", "peak_rss_gb")}
                         for e in ("edge_ds", "llama_cpp_q4_0")},
              "median_prompt_ratio": statistics.median(r["prompt_ratio"] for r in rounds),
              "median_generation_ratio": statistics.median(r["generation_ratio"] for r in rounds)}
    (out / f"onnx_bench_result{f'_d{args.depth}' if args.depth else ''}.json").write_text(json.dumps(result, indent=2))
    m = result["median"]
    print(f"| runtime (4-bit, -p {args.p} -g {args.g}" + (f" -d {args.depth}" if args.depth else "")
          + f", {args.threads} threads, median of {args.rounds} alternating rounds) | prompt tok/s | decode tok/s "
          "| peak RSS |")
    print("|---|---|---|---|")
    print(f"| llama.cpp Q4_0 (llama-bench, mean of {args.n} per round) | {m['llama_cpp_q4_0']['prompt_tps']:.1f} | "
          f"{m['llama_cpp_q4_0']['generation_tps']:.1f} | {m['llama_cpp_q4_0']['peak_rss_gb']:.2f} GB |")
    print(f"| `edge-ds convert` + `edge-ds bench` (backend {result['backend']}: {result['device']}; median of "
          f"{args.n} per round) | {m['edge_ds']['prompt_tps']:.1f} | {m['edge_ds']['generation_tps']:.1f} | "
          f"{m['edge_ds']['peak_rss_gb']:.2f} GB |")
    print(f"| ratio edge-ds / llama.cpp (median of the rounds' ratios) | {result['median_prompt_ratio']:.2f}x | "
          f"{result['median_generation_ratio']:.2f}x | |")
    print("per round (prompt, decode ratios): " + ", ".join(
        f"{r['prompt_ratio']:.2f}x/{r['generation_ratio']:.2f}x" for r in rounds))


if __name__ == "__main__":
    main()
