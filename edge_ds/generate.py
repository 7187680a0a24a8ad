"""The prefill/decode loop: tokens in, tokens out, with timing and memory stats."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterator

import mlx.core as mx

from .backend import Backend
from .cache import PromptCache
from .errors import ContextLengthError, EdgeDSError
from .sampling import Sampler, apply_repetition_penalty

PREFILL_STEP = 512


@dataclass
class GenerationStats:
    """What one generation cost; tok/s have the same meaning as mlx-lm's benchmark."""

    prompt_tokens: int = 0  # tokens in the prompt
    prefilled_tokens: int = 0  # of those, how many were run (the rest came from the cache)
    prompt_tps: float = 0.0  # prefilled tokens / time to the first generated token
    generation_tokens: int = 0
    generation_tps: float = 0.0  # generated tokens / time from the first to the last
    peak_memory_gb: float = 0.0  # the backend's peak (MLX: its peak allocation; onnx: the process's peak RSS)
    finish_reason: str = "length"  # "stop" (EOS or stop string), "length", "interrupted", "cancelled"

    def to_dict(self) -> dict:
        return asdict(self)


def generate_tokens(
    model: Backend,
    prompt: list[int],
    cache: PromptCache,
    sampler: Sampler,
    max_tokens: int,
    stats: GenerationStats,
    repetition_penalty: float | None = None,
    repetition_context: int = 64,
    prefill_step: int = PREFILL_STEP,
) -> Iterator[int]:
    """Yields up to max_tokens sampled token ids after `prompt`, reusing what `cache` already holds.

    cache.tokens always lists exactly what the cache holds (the prompt and the tokens fed
    back so far), so the next call can reuse the longest common prefix.
    """
    if not prompt:
        raise EdgeDSError("the prompt is empty")
    limit = model.config.max_position_embeddings
    if len(prompt) + max_tokens > limit:
        raise ContextLengthError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                          f"max_position_embeddings ({limit})")
    model.reset_peak_memory()
    start = time.perf_counter()
    reused = cache.reuse_prefix(prompt)
    todo = prompt[reused:]
    stats.prompt_tokens, stats.prefilled_tokens = len(prompt), len(todo)
    history = list(prompt)

    def step(tokens: list[int]) -> mx.array:
        logits = model(mx.array([tokens]), cache=cache)[:, -1, :]
        cache.tokens.extend(tokens)
        if repetition_penalty and repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, repetition_penalty, repetition_context)
        # Unnormalised: every sampler is shift-invariant, and a logsumexp over the vocabulary is a
        # measurable share of a fast decode step (README, ONNX export).
        return sampler(logits)

    # Prefill in chunks so activations stay bounded on long prompts.
    while len(todo) > prefill_step:
        model(mx.array([todo[:prefill_step]]), cache=cache)
        mx.eval([c.state for c in cache])
        cache.tokens.extend(todo[:prefill_step])
        todo = todo[prefill_step:]
    token = step(todo)
    mx.eval(token)
    first = time.perf_counter()
    stats.prompt_tps = len(prompt[reused:]) / max(first - start, 1e-9)

    n = 0
    while n < max_tokens:
        t = token.item()
        history.append(t)
        n += 1
        if n < max_tokens:
            # Queue the next step before handing this token out, so the model runs while the
            # caller detokenizes and prints.
            token = step([t])
            mx.async_eval(token)
        stats.generation_tokens = n
        stats.generation_tps = n / max(time.perf_counter() - first, 1e-9)
        stats.peak_memory_gb = model.peak_memory_bytes() / 1e9
        yield t


def stop_string_hold(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could start a stop string (to hold back)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
