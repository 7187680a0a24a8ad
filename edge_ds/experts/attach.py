"""Wire lazy experts into a loaded trunk: one ExpertCache, one LazySwitchGLU per MoE layer."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeDSError
from .budget import format_bytes, parse_budget
from .cache import ExpertCache
from .policy import make_policy
from .store import PROJS, ExpertStore
from .switch import LazySwitchGLU

LOOKAHEAD = 4  # layers whose experts each layer predicts (a router matvec each)


def attach_experts(model, directory: str | Path, budget: int | str, policy: str = "hybrid",
                   prefetch: bool = False, threads: int = 4, page_cache: bool = True,
                   lookahead: int = LOOKAHEAD) -> ExpertCache:
    """Gives every MoE layer of `model` (loaded with routed_experts=False) experts read on
    demand from `directory` into a cache of at most `budget` bytes. Each layer also runs the
    next `lookahead` layers' routers on its input: their guesses steer eviction (and prefetch)."""
    from ..loading import quantization_of

    cfg = model.config
    if not cfg.moe_layers:
        raise EdgeDSError(f"{directory}: expert_budget: the model has no MoE layers")
    store = ExpertStore(directory, cfg, model.dtype, threads=threads, page_cache=page_cache)
    nbytes = parse_budget(budget, store.routed_bytes)
    slots = nbytes // store.expert_bytes
    k = cfg.num_experts_per_tok
    if slots < k:
        store.close()
        raise EdgeDSError(f"expert_budget {budget!r} ({format_bytes(nbytes)}) holds {slots} experts; one token needs "
                          f"top_k = {k} at once ({format_bytes(k * store.expert_bytes)})")
    cache = ExpertCache(store, slots, make_policy(policy), k, prefetch=prefetch)
    layers = cfg.moe_layers
    for i, l in enumerate(layers):
        quant = {}
        for proj in PROJS:
            q = None
            if f"{proj}.scales" in store.tensors[l]:
                q = quantization_of(cfg, f"model.layers.{l}.mlp.switch_mlp.{proj}")
                if q is None:
                    raise EdgeDSError(f"{directory}/config.json: layer {l}'s {proj} experts are quantized but "
                                      f"config.json has no 'quantization'")
            quant[proj] = q
        ahead = [(m, model.layers[m].mlp.gate) for m in layers[i + 1: i + 1 + lookahead]]
        model.layers[l].mlp.switch_mlp = LazySwitchGLU(l, cache, quant, ahead)
    return cache
