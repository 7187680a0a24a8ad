"""The prefill/decode loop: tokens in, tokens out, with timing and memory stats."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .arrays import evaluate, library
from .errors import ContextLengthError, EdgeDSError
from .sampling import Sampler, apply_repetition_penalty

if TYPE_CHECKING:
    from .backend import Backend
    from .cache import PromptCache
    from .config import ModelConfig

PREFILL_STEP = 512  # most prompt tokens per prefill forward
# Attention materialises one layer's scores [heads, chunk, context] in float32 at a time; a chunk
# shrinks once that would pass this (V3's 128 heads past ~4k tokens of context; the small models never).
SCORES_BUDGET = 1 << 30


def prefill_chunk(config: "ModelConfig", cached: int, step: int = PREFILL_STEP) -> int:
    """Prompt tokens for the next prefill forward after `cached` tokens: `step`, or fewer (down to
    16) so that the attention scores of a chunk of that many against the whole context stay within
    SCORES_BUDGET bytes."""
    per_token = 4 * config.num_attention_heads * (cached + step)
    return min(step, max(16, SCORES_BUDGET // per_token))



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


@dataclass
class TokenLogprob:
    """The log-probability of one generated token and of the most likely tokens at its step.

    Of the model's distribution at that step after the repetition penalty, before temperature and
    the top-k/top-p/min-p filters (as mlx-lm reports; OpenAI's do not change with temperature): the
    distribution sampled from would make every token of a greedy answer log 1 = 0 and every other
    one -inf (README, Local server)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first
    offset: int = 0  # where the token's text starts in the generated text (set by the API)


def token_logprob(token: int, logits: np.ndarray, k: int) -> TokenLogprob:
    """The TokenLogprob of `token` from one step's logits [V] (float32), with the k likeliest tokens.

    In numpy, after the step: on a CPU it is 2-5x faster than MLX's logsumexp and argpartition over a
    129k vocabulary (measured here), and it runs while the next step computes."""
    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))
    out = TokenLogprob(token, float(logits[token]) - lse)
    if k > 0:
        k = min(k, logits.shape[-1])
        top = np.argpartition(-logits, k - 1)[:k]
        top = top[np.argsort(-logits[top], kind="stable")]  # argpartition leaves the k unordered
        out.top = [(int(i), float(logits[i]) - lse) for i in top]
    return out


def generate_tokens(
    model: "Backend",
    prompt: list[int],
    cache: "PromptCache",
    sampler: Sampler,
    max_tokens: int,
    stats: GenerationStats,
    repetition_penalty: float | None = None,
    repetition_context: int = 64,
    prefill_step: int = PREFILL_STEP,
    logprobs: int | None = None,
    logprobs_out: list[TokenLogprob] | None = None,
) -> Iterator[int]:
    """Yields up to max_tokens sampled token ids after `prompt`, reusing what `cache` already holds.

    logprobs (None: off) appends a TokenLogprob for each yielded token to `logprobs_out` before the
    token is yielded, with the `logprobs` most likely alternatives (0: the chosen token's only).
    The log-softmax runs only then: the normal decode step never normalises.

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

    want_logprobs = logprobs is not None
    if want_logprobs and logprobs_out is None:
        raise EdgeDSError("generate_tokens: logprobs needs a logprobs_out list")
    xp = library(model)  # the array library the backend computes in (arrays.py)
    pending: tuple[Any, ...] = ()  # with logprobs: the logits row of the step in flight

    def step(tokens: list[int]) -> Any:
        nonlocal pending
        logits = model(xp.array([tokens], dtype=xp.int32), cache=cache)[:, -1, :]
        cache.tokens.extend(tokens)
        if repetition_penalty and repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, repetition_penalty, repetition_context)
        # Unnormalised: every sampler is shift-invariant, and a logsumexp over the vocabulary is a
        # measurable share of a fast decode step (README, ONNX export).
        token = sampler(logits)
        if want_logprobs:
            pending = (logits[0].astype(xp.float32),)
        return token

    # Prefill in chunks so activations stay bounded on long prompts.
    while len(todo) > (chunk := prefill_chunk(model.config, len(cache.tokens), prefill_step)):
        model(xp.array([todo[:chunk]], dtype=xp.int32), cache=cache)
        evaluate(xp, [c.state for c in cache])
        cache.tokens.extend(todo[:chunk])
        todo = todo[chunk:]
    token = step(todo)
    evaluate(xp, token, *pending)
    first = time.perf_counter()
    stats.prompt_tps = len(prompt[reused:]) / max(first - start, 1e-9)

    n = 0
    while n < max_tokens:
        t = token.item()
        row = np.array(pending[0]) if want_logprobs else None  # this step's, before step() replaces it
        history.append(t)
        n += 1
        if n < max_tokens:
            # Queue the next step before handing this token out, so the model runs while the
            # caller detokenizes and prints (and the logprobs below are computed).
            token = step([t])
            evaluate(xp, token, *pending, wait=False)
        if row is not None:
            logprobs_out.append(token_logprob(t, row, logprobs))
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
