"""Lazy expert loading: routed experts read on demand into a byte-budgeted cache.

store.py   where each expert's slices are in the safetensors files; parallel preads
cache.py   ExpertCache: preallocated slots, residency, pinning of slots still in use
policy.py  LRU, LFU and the LFU/LRU hybrid (decayed frequency)
switch.py  LazySwitchGLU: a MoE layer's experts computed from cache slots, exactly
budget.py  "2GB" / "512MiB" / "25%" -> bytes
stats.py   hits, misses, bytes read, read speed
"""

from .attach import attach_experts
from .budget import parse_budget
from .cache import ExpertCache
from .policy import LFU, LRU, DecayedFrequency, Policy, make_policy
from .store import ExpertStore, drop_page_cache, is_routed_expert

__all__ = ["attach_experts", "parse_budget", "ExpertCache", "ExpertStore", "Policy", "LRU", "LFU",
           "DecayedFrequency", "make_policy", "drop_page_cache", "is_routed_expert"]
