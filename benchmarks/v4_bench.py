"""DeepSeek-V4 next to DeepSeek-V3 at growing context, and V4 with lazy experts.

Two ~450M-parameter models with random weights at 4 bits (group 64), written as converted model
directories and loaded the way `edge-ds` loads them:
  - V4-Flash-shaped: V4-Flash's widths scaled by 1/4 (hidden 1024, 16 heads of 128, q_lora 256,
    o_groups 8 x 256, index 16 heads of 32), its real attention constants (sliding window 128,
    CSA every 4 tokens keeping index_topk 512 entries, HCA every 128, hc_mult 4, 20 Sinkhorn
    steps), its layer schedule (two sliding layers, then CSA and HCA alternating; the first three
    MoE layers hash-routed), 28 experts top-6 of width 512 plus one shared;
  - V3-shaped: benchmarks/bench_model.py's configuration (the README's reference model).
For contexts 128, 2k and 8k it reports prompt tok/s (prefill in 512-token chunks, as generate()
does), decode tok/s (bursts taken round-robin over the contexts' caches, median), peak memory
and the prompt cache's bytes; then V4's decode at 25% and 10% expert budgets against resident
(measured after the contexts, so compare them with care on a machine whose load moves).

    python benchmarks/v4_bench.py [--contexts 128,2048,8192] [--trials 3] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from benchmarks.bench_model import BENCH_CONFIG  # noqa: E402
from edge_ds import layout, models  # noqa: E402
from edge_ds.config import ModelConfig  # noqa: E402
from edge_ds.experts import attach_experts  # noqa: E402
from edge_ds.loading import load_model  # noqa: E402

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
V4_SHAPE = dict(
    model_type="deepseek_v4", vocab_size=32000, hidden_size=1024, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, head_dim=128, q_lora_rank=256, partial_rotary_factor=0.125, o_groups=8,
    o_lora_rank=256, n_routed_experts=28, num_experts_per_tok=6, n_shared_experts=1, index_n_heads=16,
    index_head_dim=32, index_topk=512, sliding_window=128, compress_rates={CSA: 4, HCA: 128}, hc_mult=4,
    layer_types=[SWA, SWA, CSA, HCA, CSA, HCA, CSA, HCA], num_hash_layers=3, max_position_embeddings=65536,
    rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 4096},
)
V3_SHAPE = dict(BENCH_CONFIG, model_type="deepseek_v3", max_position_embeddings=65536)
CHUNK = 512
GROUP = 64


def write_model(shape: dict, out: Path) -> Path:
    """A random 4-bit model directory (mlx-lm layout, as `edge-ds convert` writes it)."""
    if (out / "config.json").is_file():
        return out
    cfg = ModelConfig.from_dict(shape, "benchmark")
    model = models.build(cfg, [])
    mx.random.seed(0)
    params = tree_flatten(model.parameters())
    weights = {}
    for k, v in params:
        if k.endswith("tid2eid"):
            weights[k] = mx.random.randint(0, cfg.n_routed_experts, v.shape).astype(mx.int32)
        elif v.ndim >= 2:
            weights[k] = mx.random.normal(v.shape) * 0.02
        else:
            weights[k] = mx.ones(v.shape) if "norm" in k or k.endswith("scale") else mx.zeros(v.shape)
    model.load_weights(list(weights.items()))
    nn.quantize(model, GROUP, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % GROUP == 0 and not p.endswith("mlp.gate"))
    out.mkdir(parents=True)
    arrays = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "mlx"})
    quantization = {"group_size": GROUP, "bits": 4, "mode": "affine"}
    (out / layout.CONFIG_FILE).write_text(json.dumps(dict(shape, quantization=quantization), indent=2))
    return out


def prefill(model, cache, ids: mx.array) -> float:
    start = time.perf_counter()
    for s in range(0, ids.shape[1], CHUNK):
        mx.eval(model(ids[:, s:s + CHUNK], cache))
    return ids.shape[1] / (time.perf_counter() - start)


def decode(model, cache, tokens: int) -> float:
    token = mx.array([[1]])
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(model(token, cache)[:, -1], axis=-1)[None]
        mx.eval(token)
    return tokens / (time.perf_counter() - start)


def run(model, contexts: list[int], trials: int, decode_tokens: int) -> list[dict]:
    """Per context: prompt tok/s (median of trials, each from an empty cache), then decode tok/s
    measured round-robin over the contexts' caches in bursts of decode_tokens (median), so a
    change in the machine's load hits every context alike; peak memory and the cache's bytes."""
    vocab = model.config.vocab_size
    rows, caches = [], []
    for c in contexts:
        prompt, peak = [], 0
        for t in range(trials):
            mx.reset_peak_memory()
            cache = model.make_cache()
            prompt.append(prefill(model, cache, mx.random.randint(0, vocab, (1, c), key=mx.random.key(t))))
            peak = max(peak, mx.get_peak_memory())
        caches.append(cache)
        rows.append({"context": c, "prompt_tps": statistics.median(prompt), "peak_memory_gb": peak / 1e9})
    bursts = [[] for _ in contexts]
    for _ in range(trials + 1):
        for i, cache in enumerate(caches):
            bursts[i].append(decode(model, cache, decode_tokens))
    for row, cache, b in zip(rows, caches, bursts):
        row.update(decode_tps=statistics.median(b[1:]), cache_mb=cache.nbytes / 1e6)  # the first: warm-up
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,2048,8192")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edge-ds-v4-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    dirs = {"v4": write_model(V4_SHAPE, args.out / "v4"), "v3": write_model(V3_SHAPE, args.out / "v3")}
    result = {"device": str(mx.default_device()), "rows": {}, "budgets": {}}
    for name, d in dirs.items():
        model = load_model(d)
        params = sum(v.size for _, v in tree_flatten(model.parameters()))
        result[f"{name}_packed_params"] = params
        result["rows"][name] = run(model, contexts, args.trials, args.decode_tokens)
        del model
    resident = result["rows"]["v4"][0]["decode_tps"]
    for budget in ("25%", "10%"):
        model = load_model(dirs["v4"], routed_experts=False)
        attach_experts(model, dirs["v4"], budget)
        result["budgets"][budget] = run(model, contexts[:1], args.trials, args.decode_tokens)[0]
        del model
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['device']}; 4-bit; medians of {args.trials} trials")
    print("| context | V4 prompt | V4 decode | V4 peak | V4 cache | V3 prompt | V3 decode | V3 peak | V3 cache |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v4, v3 in zip(result["rows"]["v4"], result["rows"]["v3"]):
        print(f"| {v4['context']} | {v4['prompt_tps']:.0f} tok/s | {v4['decode_tps']:.1f} tok/s "
              f"({v4['decode_tps'] / resident:.2f}x) | {v4['peak_memory_gb']:.2f} GB | {v4['cache_mb']:.1f} MB "
              f"| {v3['prompt_tps']:.0f} tok/s | {v3['decode_tps']:.1f} tok/s | {v3['peak_memory_gb']:.2f} GB "
              f"| {v3['cache_mb']:.1f} MB |")
    print("\n| V4 expert budget | decode | vs resident | peak |")
    print("|---|---|---|---|")
    for budget, row in result["budgets"].items():
        print(f"| {budget} | {row['decode_tps']:.1f} tok/s | {row['decode_tps'] / resident:.2f}x "
              f"| {row['peak_memory_gb']:.2f} GB |")


if __name__ == "__main__":
    main()
