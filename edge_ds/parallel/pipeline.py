"""Pipeline parallelism: decoder layers split into contiguous stages, one per rank.

Rank 0 embeds the tokens and runs the first stage; each rank receives the [B, L, D] activations
from the rank before it (mx.distributed.recv), runs its layers and sends them on (send); the last
rank applies the final norm and the head. Its logits reach every rank through one all_sum (the
other ranks add zeros, so the sum is exact), which is what rank 0 samples from. Every rank runs
its layers with the same code as one process, in the same order, so logits are bit-identical.
This adds capacity (each rank reads and holds only its layers), not speed: one rank works at a time.
DeepSeek V2/V3-family decoders (models/deepseek.py); V4's hyper-connection streams are not split.
"""

from __future__ import annotations

import mlx.core as mx

from ..config import ModelConfig
from ..models.deepseek import causal_mask
from .plan import ParallelError


def stages(cfg: ModelConfig, size: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges [lo, hi) per rank, as even as possible (earlier ranks take the
    remainder: rank 0 also embeds, the last rank also runs the head)."""
    n = cfg.num_hidden_layers
    if cfg.model_type == "deepseek_v4":
        raise ParallelError("--parallel pipeline: DeepSeek-V4 is not supported yet (use --parallel expert)")
    if n < size:
        raise ParallelError(f"--parallel pipeline: num_hidden_layers = {n} is fewer than the {size} ranks "
                            "(every rank needs at least one layer)")
    base, extra = divmod(n, size)
    out, lo = [], 0
    for r in range(size):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class PipelineStage:
    """One rank's stage, callable like the model: tokens [B, L] -> logits [B, L or 1, V] (every rank)."""

    def __init__(self, model, lo: int, hi: int, group: mx.distributed.Group):
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.lo, self.hi = lo, hi
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return self.model.make_cache()

    def parameters(self):
        return self.model.parameters()

    def __call__(self, tokens: mx.array, cache=None, last_only: bool = False) -> mx.array:
        m, cfg, g = self.model, self.config, self.group
        B, L = tokens.shape
        offset = cache[self.lo].offset if cache else 0  # layers before lo never fill on this rank
        mask = causal_mask(L, offset, self.dtype) if L > 1 else None
        if self.rank == 0:
            h = m.model.embed_tokens(tokens).astype(self.dtype)  # [B, L, D]
        else:
            h = mx.distributed.recv((B, L, cfg.hidden_size), self.dtype, self.rank - 1, group=g)
        for i in range(self.lo, self.hi):
            h = m.layers[i](h, mask, cache[i] if cache else None)
        rows = 1 if last_only else L
        if self.rank == self.size - 1:
            h = m.model.norm(h[:, -1:] if last_only else h)
            logits = (m.lm_head(h) if "lm_head" in m else m.model.embed_tokens.as_linear(h)).astype(self.dtype)
        else:
            sent = mx.distributed.send(h, self.rank + 1, group=g)
            # zeros that wait for the send, so the activations leave before this rank joins the all_sum
            logits = mx.depends(mx.zeros((B, rows, cfg.vocab_size), self.dtype), sent)
        return mx.distributed.all_sum(logits, group=g)
