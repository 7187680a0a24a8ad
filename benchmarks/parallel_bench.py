"""Expert, tensor or pipeline parallelism on one machine: per-rank bytes and memory, tok/s, traffic
and collective time.

    python benchmarks/parallel_bench.py MODEL_DIR                       # one process
    mlx.launch -n 2 --backend ring --python "$(which python)" benchmarks/parallel_bench.py MODEL_DIR \
        [expert|tensor|pipeline]

Prints one JSON line from rank 0. The all_sum latency is measured before the model loads (every
rank runs it), on the [1, hidden] float32 vector each MoE layer (expert) or each attention and
feed-forward block (tensor) sums per decoded token; time in collectives per token is that latency
times the collectives per token (an estimate: inside a forward the sums wait on the slower rank too).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(path: str, mode: str = "expert", prompt: int = 128, gen: int = 64, trials: int = 3) -> None:
    import mlx.core as mx

    import edge_ds
    from edge_ds.config import ModelConfig

    cfg = ModelConfig.load(Path(path))
    group = mx.distributed.init()
    size = group.size()
    allsum_us = None
    if size > 1:
        x = mx.ones((1, cfg.hidden_size), mx.float32)
        for _ in range(10):
            mx.eval(mx.distributed.all_sum(x, group=group))
        t = time.perf_counter()
        for _ in range(200):
            mx.eval(mx.distributed.all_sum(x, group=group))
        allsum_us = (time.perf_counter() - t) / 200 * 1e6
    t = time.perf_counter()
    lm = edge_ds.load(path, parallel=mode if size > 1 else None)
    load_s = time.perf_counter() - t
    ids = [int(i) for i in np.random.default_rng(0).integers(10, cfg.vocab_size - 10, prompt)]
    lm.generate(ids, max_tokens=4, temperature=0)  # warm-up
    runs = [lm.generate(ids, max_tokens=gen, temperature=0).stats for _ in range(trials)]
    moe_layers = len(cfg.moe_layers)
    out = dict(ranks=size, mode=mode if size > 1 else None, load_s=round(load_s, 2),
               prompt_tps=float(np.median([r.prompt_tps for r in runs])),
               generation_tps=float(np.median([r.generation_tps for r in runs])),
               bytes=getattr(lm.backend, "bytes_read", None))
    if size > 1 and mode == "pipeline":
        d = cfg.hidden_size * 4
        out.update(collectives_per_token=2 + 2 * (size - 1),  # step header and ids; a send/recv per boundary; logits
                   bytes_between_ranks_per_token=(size - 1) * d + cfg.vocab_size * 4, allsum_us=round(allsum_us, 1))
    elif size > 1 and mode == "tensor":
        d = cfg.hidden_size * 4
        n = 2 * cfg.num_hidden_layers  # after o_proj and after each feed-forward block, every layer
        out.update(collectives_per_token=n + 2, allsum_payload_bytes_per_token=n * d + 8 * 4 + 4,
                   allsum_us=round(allsum_us, 1), collective_ms_per_token_est=round((n + 2) * allsum_us / 1000, 2))
    elif size > 1:
        d = cfg.hidden_size * 4  # float32 on the CPU (bfloat16 on Metal: half)
        out.update(collectives_per_token=moe_layers + 2,  # one all_sum per MoE layer + the step header and ids
                   allsum_payload_bytes_per_token=moe_layers * d + 8 * 4 + 4,
                   allsum_us=round(allsum_us, 1),
                   collective_ms_per_token_est=round((moe_layers + 2) * allsum_us / 1000, 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
