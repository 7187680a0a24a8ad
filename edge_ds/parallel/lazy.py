"""Lazy experts under expert parallelism: each rank reads its own share of the routed experts on
demand into a cache of at most `--expert-budget` bytes (a share like "25%" is of the rank's share).

The experts/ machinery is reused as is: ShardStore is an ExpertStore that sees only this rank's
experts, renumbered 0..n-1 in plan order (the local ids expert.ExpertShard computes with), so the
cache, the policy and LazySwitchGLU never learn that other experts exist.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import OptionError
from ..experts.budget import format_bytes, parse_budget
from ..experts.policy import make_policy
from ..experts.slots import ExpertCache
from ..experts.store import ExpertStore
from ..experts.attach import expert_quantization
from ..experts.switch import LazySwitchGLU


class ShardStore(ExpertStore):
    """An ExpertStore over the experts `owned` (global ids) only; local id i is expert owned[i]."""

    def __init__(self, directory: str | Path, cfg, dtype, owned: list[int], **kw):
        super().__init__(directory, cfg, dtype, **kw)
        self.owned = list(owned)
        self.num_experts = len(self.owned)  # routed_bytes, and so "25%", count this rank's share
        for l, tensors in self.tensors.items():
            self.tensors[l] = {key: replace(t, names=tuple(t.names[e] for e in self.owned),
                                            paths=tuple(t.paths[e] for e in self.owned),
                                            offsets=tuple(t.offsets[e] for e in self.owned))
                               for key, t in tensors.items()}


def attach_shard(model, directory: Path, owned: list[int], budget: int | str, policy: str = "hybrid",
                 page_cache: bool = True, threads: int = 4) -> ExpertCache:
    """experts.attach_experts for one rank's share. No look-ahead hints and no prefetch: the
    next layers' routers answer in global ids, and a token's next experts may live elsewhere."""
    cfg = model.config
    store = ShardStore(directory, cfg, model.dtype, owned, threads=threads, page_cache=page_cache)
    nbytes = parse_budget(budget, store.routed_bytes)
    slots = nbytes // store.expert_bytes
    k = min(cfg.num_experts_per_tok, len(owned))  # a token needs at most this many of this rank's experts
    if slots < k:
        store.close()
        raise OptionError("expert_budget", f"{{option}} {budget!r} ({format_bytes(nbytes)}) holds {slots} experts "
                                           f"on this rank; one token may need {k} of its experts at once")
    cache = ExpertCache(store, slots, make_policy(policy), k, prefetch=False)
    for l in cfg.moe_layers:
        quant = expert_quantization(store, l, directory)
        model.layers[l].mlp.switch_mlp = LazySwitchGLU(l, cache, quant, [])
    return cache
