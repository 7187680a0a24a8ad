"""Lazy expert loading: routed experts read on demand into a byte-budgeted cache.

store.py   where each expert's slices are in the safetensors files; parallel preads
slots.py   ExpertCache: preallocated slots, residency, pinning of slots still in use
policy.py  LRU, LFU and the LFU/LRU hybrid (decayed frequency)
switch.py  LazySwitchGLU: a MoE layer's experts computed from cache slots, exactly
attach.py  gives a loaded trunk its LazySwitchGLUs
budget.py  "2GB" / "512MiB" / "25%" -> bytes
stats.py   hits, misses, bytes read, read speed
trace.py   routing traces: the format, recorded at run time
replay.py  offline analysis of a trace against LRU, LFU, hybrid and Belady
"""

from .attach import attach_experts
from .budget import parse_budget
from .policy import LFU, LRU, DecayedFrequency, Policy, make_policy
from .slots import ExpertCache
from .store import ExpertStore, drop_page_cache
from .trace import TraceRecorder

__all__ = ["attach_experts", "parse_budget", "ExpertCache", "ExpertStore", "Policy", "LRU", "LFU",
           "DecayedFrequency", "make_policy", "drop_page_cache", "TraceRecorder"]
