"""Wire lazy experts into a loaded trunk: one ExpertCache, one LazySwitchGLU per MoE layer."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeDSError, OptionError
from ..layout import CONFIG_FILE, EXPERT_PROJS, quantization_for, stacked_name
from .budget import format_bytes, parse_budget
from .policy import make_policy
from .slots import ExpertCache
from .store import ExpertStore
from .switch import LazySwitchGLU

LOOKAHEAD = 4  # layers whose experts each layer predicts (a router matvec each)


def attach_experts(model, directory: str | Path, budget: int | str, policy: str = "hybrid",
                   prefetch: bool = False, threads: int = 4, page_cache: bool = True,
                   lookahead: int = LOOKAHEAD) -> ExpertCache:
    """Gives every MoE layer of `model` (loaded with routed_experts=False) experts read on
    demand from `directory` into a cache of at most `budget` bytes. Each layer also runs the
    next `lookahead` layers' routers on its input: their guesses steer eviction (and prefetch)."""
    cfg = model.config
    if not cfg.moe_layers:
        raise OptionError("expert_budget", f"{directory}: {{option}}: the model has no MoE layers")
    store = ExpertStore(directory, cfg, model.dtype, threads=threads, page_cache=page_cache)
    nbytes = parse_budget(budget, store.routed_bytes)
    slots = nbytes // store.expert_bytes
    k = cfg.num_experts_per_tok
    if slots < k:
        store.close()
        raise OptionError("expert_budget", f"{{option}} {budget!r} ({format_bytes(nbytes)}) holds {slots} experts; "
                                           f"one token needs top_k = {k} at once ({format_bytes(k * store.expert_bytes)})")
    cache = ExpertCache(store, slots, make_policy(policy), k, prefetch=prefetch)
    layers = cfg.moe_layers
    for i, l in enumerate(layers):
        quant = expert_quantization(store, l, directory)
        ahead = [(m, model.layers[m].mlp.gate) for m in layers[i + 1: i + 1 + lookahead]]
        model.layers[l].mlp.switch_mlp = LazySwitchGLU(l, cache, quant, ahead)
    return cache


def expert_quantization(store: ExpertStore, layer: int, directory: str | Path) -> dict[str, dict | None]:
    """proj -> the quantization of MoE layer `layer`'s stacked experts (None where stored in float)."""
    cfg = store.cfg
    quant = {}
    for proj in EXPERT_PROJS:
        q = None
        if f"{proj}.scales" in store.tensors[layer]:
            q = quantization_for(cfg, stacked_name(layer, proj).removesuffix(".weight"))
            if q is None:
                raise EdgeDSError(f"{Path(directory) / CONFIG_FILE}: layer {layer}'s {proj} experts are quantized "
                                  "but config.json has no 'quantization'")
        quant[proj] = q
    return quant
