"""Expert parallelism: the trunk replicated on every rank, routed experts split by expert id.

Every rank runs the whole trunk on the same tokens (identical results everywhere), and each MoE
layer computes, for every token, only the pairs (token, expert) whose expert this rank holds;
one all_sum of the [N, D] routed output combines the ranks, then the (replicated) shared expert
is added on every rank. Only the all_sum crosses the network: D values per token per MoE layer.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.moe import MoE
from .plan import ExpertPlan


class ExpertShard:
    """The MoE hook (models.moe.MoE.shard) of one rank: x [N, D], indices/weights [N, k] -> [N, D].

    Pairs whose expert lives on another rank get weight 0 and are pointed at local expert 0 (a
    valid index; exactly 0 after the weighting, since the expert's output is finite), so the
    shapes stay static and no host synchronisation is needed to drop them."""

    def __init__(self, plan: ExpertPlan, group: mx.distributed.Group):
        self.plan = plan
        self.group = group
        local = np.zeros(plan.num_experts, np.int32)
        mine = np.zeros(plan.num_experts, bool)
        for i, e in enumerate(plan.owned):
            local[e], mine[e] = i, True
        self.local = mx.array(local)  # [E] global id -> local id (0 where not held here)
        self.mine = mx.array(mine)  # [E] held by this rank

    def __call__(self, moe: MoE, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        w = mx.where(self.mine[indices], weights, mx.zeros_like(weights))  # [N, k]
        y = moe._routed(x, self.local[indices], w)  # [N, D]: this rank's experts only
        y = mx.distributed.all_sum(y, group=self.group)
        if "shared_experts" in moe:
            y = y + moe.shared_experts(x)
        return y


def install(model: nn.Module, plan: ExpertPlan, group: mx.distributed.Group) -> int:
    """Points every MoE layer of `model` (loaded with this rank's experts) at one ExpertShard;
    returns the number of MoE layers."""
    shard = ExpertShard(plan, group)
    n = 0
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.shard = shard
            n += 1
    return n
