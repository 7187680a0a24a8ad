"""Decode cost past index_topk: DeepSeek-V3.2's sparse attention next to V3's dense attention.

One V3.2-shaped model (random weights, 4-bit like a converted model; index_topk scaled down with
the rest so the CPU gets past it quickly) is run twice: as deepseek_v32, and as deepseek_v3 on
the same weights without the indexer. For contexts of 1x, 4x and 8x index_topk it reports

  - the attention's decode step alone (one MLA layer, median of many steps), where V3.2 reads
    at most index_topk latent rows and V3 reads all of them;
  - whole-model decode tok/s (median of trials), where the indexer's own scoring of every row
    and the MoE are included.

    python benchmarks/v32_decode.py [--topk 128] [--trials 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from edge_ds.cache import LatentCache, PromptCache  # noqa: E402
from edge_ds.config import ModelConfig  # noqa: E402
from edge_ds.models.deepseek import Model, causal_mask  # noqa: E402

SHAPE = dict(  # DeepSeek-V3.2's head shapes (MLA 512 + 64, indexer 128 wide), fewer and narrower layers
    vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=16, kv_lora_rank=512, q_lora_rank=384, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=16384,
    index_n_heads=16, index_head_dim=128,
)


def build(topk: int) -> tuple[Model, Model]:
    """(deepseek_v32, deepseek_v3) on the same random weights, 4-bit, float32 activations."""
    v32 = ModelConfig.from_dict(dict(SHAPE, model_type="deepseek_v32", index_topk=topk), "benchmark")
    v3 = replace(v32, model_type="deepseek_v3", index_n_heads=None, index_head_dim=None, index_topk=None)
    mx.random.seed(0)
    sparse, dense = Model(v32), Model(v3)
    weights = {k: mx.random.normal(v.shape) * 0.02 for k, v in tree_flatten(sparse.parameters())}
    sparse.load_weights(list(weights.items()))
    dense.load_weights([(k, v) for k, v in weights.items() if ".indexer." not in k])
    for m in (sparse, dense):
        nn.quantize(m, 64, 4, class_predicate=lambda p, mod: hasattr(mod, "to_quantized")
                    and mod.weight.shape[-1] % 64 == 0)
        mx.eval(m.parameters())
    return sparse, dense


def attention_step_ms(model: Model, context: int, steps: int = 30) -> float:
    """Median time of one decode step of layer 1's attention with `context` rows cached."""
    attn = model.layers[1].self_attn
    x = mx.random.normal((1, context, SHAPE["hidden_size"])) * 0.5
    cache = LatentCache()
    mx.eval(attn(x, causal_mask(context, 0, mx.float32), cache))
    one = mx.random.normal((1, 1, SHAPE["hidden_size"])) * 0.5
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(attn(one, None, cache))
        times.append(time.perf_counter() - start)
        cache.rewind(1)
    return statistics.median(times) * 1e3


def decode_tps(model: Model, context: int, tokens: int = 16) -> float:
    cache = PromptCache(len(model.layers))
    ids = mx.random.randint(0, SHAPE["vocab_size"], (1, context))
    for start in range(0, context, 512):  # prefill in chunks, as generate() does
        mx.eval(model(ids[:, start:start + 512], cache=cache), [c.state for c in cache])
    token = mx.array([[1]])
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1)[None]
        mx.eval(token)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topk", type=int, default=128, help="index_topk of the benchmark model")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sparse, dense = build(args.topk)
    rows = []
    for mult in (1, 4, 8):
        context = mult * args.topk
        row = {"context": context}
        for name, model in (("v32", sparse), ("v3", dense)):
            row[f"{name}_attention_ms"] = attention_step_ms(model, context)
            row[f"{name}_decode_tps"] = statistics.median(decode_tps(model, context) for _ in range(args.trials))
        rows.append(row)
    if args.json:
        print(json.dumps({"index_topk": args.topk, "device": str(mx.default_device()), "rows": rows}, indent=2))
        return
    base = rows[0]
    print(f"index_topk {args.topk}, {mx.default_device()}; ratios are against the same model at 1x index_topk")
    print("| context | V3.2 attention step | V3 attention step | V3.2 decode | V3 decode |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} ({r['context'] // args.topk}x) "
              f"| {r['v32_attention_ms']:.2f} ms ({r['v32_attention_ms'] / base['v32_attention_ms']:.2f}x) "
              f"| {r['v3_attention_ms']:.2f} ms ({r['v3_attention_ms'] / base['v3_attention_ms']:.2f}x) "
              f"| {r['v32_decode_tps']:.1f} tok/s ({r['v32_decode_tps'] / base['v32_decode_tps']:.2f}x) "
              f"| {r['v3_decode_tps']:.1f} tok/s ({r['v3_decode_tps'] / base['v3_decode_tps']:.2f}x) |")


if __name__ == "__main__":
    main()
