"""Eviction policies over (layer, expert) keys, shared by the runtime cache and trace replay.

Time `t` counts tokens. A policy sees every use of a key and ranks keys for eviction; it
never sees the future (Belady's optimum, which does, lives in replay.py).
"""

from __future__ import annotations

import heapq
import math
from typing import Iterable

from ..errors import OptionError

ExpertKey = tuple[int, int]  # (layer, expert): what the expert cache holds and policies rank


class Policy:
    name = "policy"

    def access(self, key: ExpertKey, t: int) -> None:
        """`key` was used at time t (a hit, or a miss that loaded it)."""

    def evicted(self, key: ExpertKey) -> None:
        """`key` left the cache."""

    def set_hints(self, hints: dict[ExpertKey, int]) -> None:
        """Keys the coming layers of this token are predicted to use (key -> layers ahead); a
        policy without lookahead ignores them."""

    def priority(self, key: ExpertKey) -> float:
        """Higher stays longer."""
        raise NotImplementedError

    def victims(self, keys: Iterable[ExpertKey], n: int) -> list[ExpertKey]:
        """The n keys to evict first."""
        return heapq.nsmallest(n, keys, key=self.priority)


class LRU(Policy):
    """Least recently used."""

    name = "lru"

    def __init__(self):
        self.last: dict[ExpertKey, int] = {}

    def access(self, key, t):
        self.last[key] = t

    def evicted(self, key):
        self.last.pop(key, None)

    def priority(self, key):
        return self.last.get(key, -1)


class LFU(Policy):
    """Least frequently used over the whole history (counts survive eviction); ties by recency."""

    name = "lfu"

    def __init__(self):
        self.count: dict[ExpertKey, int] = {}
        self.last: dict[ExpertKey, int] = {}

    def access(self, key, t):
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = t

    def priority(self, key):
        return self.count.get(key, 0) + self.last.get(key, -1) * 1e-12


class DecayedFrequency(Policy):
    """The LFU/LRU hybrid: each use adds 1 to a score that halves every `half_life` tokens.

    A short half-life behaves like LRU, a long one like LFU; in between, experts that a prompt's
    topic keeps choosing stay, and a burst of one-off uses fades. Scores survive eviction, so a
    popular expert that was pushed out comes back with its history. Experts hinted for the next
    layers of the current token rank above all others (see set_hints). Ranking uses
    log2(score) + t_last / half_life, which orders keys as their decayed scores at any common
    time would, without touching every key each token.
    """

    name = "hybrid"

    def __init__(self, half_life: float = 16.0):
        self.half_life = float(half_life)
        self.score: dict[ExpertKey, float] = {}
        self.last: dict[ExpertKey, int] = {}
        self.hints: dict[ExpertKey, int] = {}

    def set_hints(self, hints: dict[ExpertKey, int]) -> None:
        """Hinted keys are kept before anything else, nearest first. The predictions are the later
        layers' routers run on the current layer's input (switch.py); they only order evictions."""
        self.hints = hints

    def access(self, key, t):
        s = self.score.get(key)
        if s is None:
            self.score[key] = 1.0
        else:
            self.score[key] = s * 2.0 ** (-(t - self.last[key]) / self.half_life) + 1.0
        self.last[key] = t

    def priority(self, key):
        ahead = self.hints.get(key)
        if ahead is not None:
            return HINTED - ahead
        s = self.score.get(key)
        if s is None:
            return -math.inf
        return math.log2(s) + self.last[key] / self.half_life


HINTED = 1e15  # above any decayed-frequency priority


POLICIES = {"lru": LRU, "lfu": LFU, "hybrid": DecayedFrequency}


def make_policy(name: str, **options) -> Policy:
    if name not in POLICIES:
        raise OptionError("expert_policy", f"{{option}}: unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    return POLICIES[name](**options)
