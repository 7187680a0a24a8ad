"""`edge-ds bench`: prompt and generation throughput with mlx-lm's benchmark semantics."""

from __future__ import annotations

import statistics

import numpy as np

from .api import LanguageModel
from .generate import GenerationStats, generate_tokens
from .sampling import make_sampler


def run_bench(lm: LanguageModel, prompt_tokens: int = 128, generation_tokens: int = 64, trials: int = 3) -> dict:
    """Random prompt of `prompt_tokens` ids, greedy decode of `generation_tokens` (no EOS stop),
    one warm-up run, then `trials` timed runs, each from an empty cache."""
    prompt = np.random.default_rng(0).integers(0, lm.config.vocab_size, prompt_tokens).tolist()
    sampler = make_sampler(0.0)

    def once() -> GenerationStats:
        stats = GenerationStats()
        for _ in generate_tokens(lm.backend, prompt, lm.new_cache(), sampler, generation_tokens, stats):
            pass
        return stats

    once()
    if lm.experts is not None:
        lm.experts.stats.reset()  # report the timed runs, with the cache as the warm-up left it
    runs = [once() for _ in range(trials)]
    result = {
        "model": str(lm.path),
        "prompt_tokens": prompt_tokens,
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
