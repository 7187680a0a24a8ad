"""`edge-ds bench`: prompt and generation throughput with mlx-lm's benchmark semantics."""

from __future__ import annotations

import statistics

import numpy as np

from .api import LanguageModel
from .errors import EdgeDSError
from .generate import GenerationStats, generate_tokens
from .sampling import make_sampler


def run_bench(lm: LanguageModel, prompt_tokens: int = 128, generation_tokens: int = 64, trials: int = 3,
              depth: int = 0) -> dict:
    """Random prompt of `prompt_tokens` ids, greedy decode of `generation_tokens` (no EOS stop),
    one warm-up run, then `trials` timed runs, each from an empty cache, or (depth > 0, llama-bench's
    -d) from a cache already holding `depth` random tokens, filled before the clock starts."""
    limit = lm.config.max_position_embeddings
    if depth < 0 or depth + prompt_tokens + generation_tokens > limit:
        raise EdgeDSError(f"depth {depth} + prompt {prompt_tokens} + generated {generation_tokens} tokens must fit "
                          f"the model's max_position_embeddings ({limit})")
    rng = np.random.default_rng(0)
    context = rng.integers(0, lm.config.vocab_size, depth).tolist()
    prompt = rng.integers(0, lm.config.vocab_size, prompt_tokens).tolist()
    sampler = make_sampler(0.0)

    def once() -> GenerationStats:
        cache = lm.new_cache()
        if context:  # fills the cache with the context (one step's logits sampled, not fed back)
            for _ in generate_tokens(lm.backend, context, cache, sampler, 1, GenerationStats()):
                pass
        stats = GenerationStats()
        for _ in generate_tokens(lm.backend, context + prompt, cache, sampler, generation_tokens, stats):
            pass
        return stats

    once()
    if lm.experts is not None:
        lm.experts.stats.reset()  # report the timed runs, with the cache as the warm-up left it
    runs = [once() for _ in range(trials)]
    result = {
        "model": str(lm.path),
        "prompt_tokens": prompt_tokens,
        "depth": depth,
        "generation_tokens": generation_tokens,
        "trials": trials,
        "prompt_tps": statistics.median(r.prompt_tps for r in runs),
        "generation_tps": statistics.median(r.generation_tps for r in runs),
        "peak_memory_gb": max(r.peak_memory_gb for r in runs),
        "prompt_tps_runs": [round(r.prompt_tps, 3) for r in runs],
        "generation_tps_runs": [round(r.generation_tps, 3) for r in runs],
        "backend": lm.backend.name,
        "device": lm.backend.device,
    }
    if lm.experts is not None:
        result["experts"] = lm.expert_stats()
    return result
