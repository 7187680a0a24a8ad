"""Counters of the expert cache: what was found, what was read, how fast."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExpertStats:
    """Decode and prefill are counted apart: prefill streams experts past the cache."""

    layers: list[int]
    hits: dict[int, int] = field(default_factory=dict)  # decode, per layer
    misses: dict[int, int] = field(default_factory=dict)  # decode, per layer
    prefill_hits: int = 0
    prefill_misses: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    decode_bytes_read: int = 0
    bytes_read: int = 0  # everything, prefetches included
    read_seconds: float = 0.0  # wall time of the reads a step waited for
    waited_bytes: int = 0  # bytes of those reads
    prefetch_issued: int = 0
    prefetch_used: int = 0
    evictions: int = 0

    def __post_init__(self):
        for l in self.layers:
            self.hits.setdefault(l, 0)
            self.misses.setdefault(l, 0)

    def reset(self) -> None:
        fresh = ExpertStats(self.layers)
        self.__dict__.update(fresh.__dict__)

    def to_dict(self, resident_bytes: int, capacity_bytes: int, routed_bytes: int, expert_bytes: int) -> dict:
        hits, misses = sum(self.hits.values()), sum(self.misses.values())
        return {
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / max(hits + misses, 1),
            "hit_rate_per_layer": {l: self.hits[l] / max(self.hits[l] + self.misses[l], 1) for l in self.layers},
            "prefill_hits": self.prefill_hits,
            "prefill_misses": self.prefill_misses,
            "decode_tokens": self.decode_tokens,
            "prefill_tokens": self.prefill_tokens,
            "bytes_read": self.bytes_read,
            "bytes_read_per_token": self.decode_bytes_read / max(self.decode_tokens, 1),
            "read_gbps": self.waited_bytes / self.read_seconds / 1e9 if self.read_seconds else 0.0,
            "read_seconds": self.read_seconds,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_used": self.prefetch_used,
            "evictions": self.evictions,
            "resident_expert_bytes": resident_bytes,
            "budget_bytes": capacity_bytes,
            "routed_expert_bytes": routed_bytes,
            "expert_bytes": expert_bytes,
        }
