"""Perplexity of a text under a model, the way llama.cpp's and mlx-lm's perplexity tools measure it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np

from .api import LanguageModel
from .arrays import library
from .backend import Backend
from .errors import OptionError


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per predicted token
    tokens: int  # predicted tokens


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of window + 1 tokens sharing one token at each seam; each window
    predicts its last `window` tokens from what precedes them inside the window."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    return [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]


def window_nll(model: Backend, windows: list[list[int]], batch: int = 8,
               progress: Callable[[int, int, str], None] | None = None) -> tuple[float, int]:
    """Sum of -log p(token | window prefix) over all windows, and the count of predicted tokens;
    progress(windows done, windows in all, "") after each batch."""
    xp = library(model)
    total, count, done = 0.0, 0, 0
    by_length: dict[int, list[list[int]]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    for group in by_length.values():
        for i in range(0, len(group), batch):
            tokens = xp.array(np.array(group[i:i + batch], dtype=np.int32))  # [B, T + 1]
            logits = model(tokens[:, :-1]).astype(xp.float32)  # [B, T, V]
            logprobs = logits - _logsumexp(xp, logits)
            picked = xp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)  # [B, T, 1]
            total -= picked.sum().item()
            count += picked.size
            done += len(group[i:i + batch])
            if progress:
                progress(done, len(windows), "")
    return total, count


def _logsumexp(xp: ModuleType, x: Any) -> Any:
    """log(sum(exp(x))) over the last axis, kept: [..., 1]."""
    if xp is np:
        m = x.max(axis=-1, keepdims=True)
        return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return xp.logsumexp(x, axis=-1, keepdims=True)


def perplexity(lm: LanguageModel, text: str, window: int = 256, batch: int = 8,
               progress: Callable[[int, int, str], None] | None = None) -> Perplexity:
    """Perplexity of `text` (encoded with BOS, as one sequence) under a loaded LanguageModel."""
    limit = lm.config.max_position_embeddings
    if window < 1:
        raise OptionError("window", f"{{option}} must be at least 1, got {window}")
    if window + 1 > limit:
        raise OptionError("window", f"{{option}} ({window}) + 1 tokens exceed the model's max_position_embeddings "
                                    f"({limit}): the largest window is {limit - 1}")
    ids = lm.check_ids(lm.tokenizer.encode(text))
    nll, count = window_nll(lm.backend, split_windows(ids, window), batch, progress)
    if count == 0:
        raise ValueError("text is too short: it must encode to at least two tokens")
    return Perplexity(math.exp(nll / count), nll / count, count)
