"""Tensor parallelism (mlx-lm's scheme for DeepSeek): heads and intermediate dimensions split.

Each rank holds its share of every attention layer's heads and of every feed-forward block's
intermediate dimension (plan.TensorPlan: who holds which rows and columns; slices.py: reading
only those bytes). A rank's attention computes its heads only, and its o_proj (this rank's input
columns) gives a partial [B, L, D] sum that one all_sum completes; likewise each dense MLP after
its down projection, and each MoE layer once, after its routed experts (every token's k pairs,
each on this rank's slice of the expert) and its shared expert are added up. Everything before
those sums (embedding, norms, q_a/kv_a projections, the latent cache, routers, the head) is
replicated and computed identically on every rank. So 2 all_sums of [tokens, D] per layer.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.moe import MoE


class SumAfter(nn.Module):
    """A linear layer holding this rank's input columns: its partial output summed over the ranks.
    x [..., in / size] -> [..., out] (the same on every rank)."""

    def __init__(self, linear: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.linear = linear
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.linear(x), group=self.group)


class TensorMoE:
    """The MoE hook (models.moe.MoE.shard) of a tensor-parallel rank: x [N, D], indices/weights
    [N, k] -> [N, D]. Every pair runs on this rank's slice of its expert; the routed and shared
    partial sums are added before the one all_sum, as in one process (the CPU's two streams kept)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group

    def __call__(self, moe: MoE, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        if moe.split_on_cpu(indices):
            y = moe._two_streams(x, indices, weights)
        else:
            y = moe._routed(x, indices, weights)
            if "shared_experts" in moe:
                y = y + moe.shared_experts(x)
        return mx.distributed.all_sum(y, group=self.group)


def install(model: nn.Module, group: mx.distributed.Group) -> int:
    """Puts the all_sums into `model` (loaded with this rank's slices): after every o_proj, every
    dense MLP's down_proj and every MoE layer. A bias of o_proj is kept on rank 0 only (it must be
    added once). Returns the number of all_sums per forward."""
    n = 0
    for layer in model.layers:
        attn = layer.self_attn
        if group.rank() != 0 and "bias" in attn.o_proj:
            attn.o_proj.bias = mx.zeros_like(attn.o_proj.bias)
        attn.o_proj = SumAfter(attn.o_proj, group)
        if isinstance(layer.mlp, MoE):
            layer.mlp.shard = TensorMoE(group)
        else:
            layer.mlp.down_proj = SumAfter(layer.mlp.down_proj, group)
        n += 2
    return n
