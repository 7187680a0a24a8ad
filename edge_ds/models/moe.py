"""Feed-forward blocks: the dense SwiGLU MLP and the routed Mixture-of-Experts."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .layers import ExpertLinear, Linear, cpu_streams

# From this many (token, expert) pairs a call sorts the pairs by expert (prefill-sized); below
# it, a decode-sized call gathers each pair and, on the CPU, splits the experts over two
# streams. experts/switch.py follows the same rule, so the lazy path stays bit-identical.
SORT_PAIRS = 64


def swiglu(gate: mx.array, up: mx.array, limit: float | None = None) -> mx.array:
    """silu(gate) * up; with a limit (DeepSeek-V4's swiglu_limit) gate is capped at it and up
    clipped to +-limit first."""
    if limit is not None:
        gate, up = mx.minimum(gate, limit), mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(swiglu(gate(x), up(x))); x [..., D]."""

    def __init__(self, hidden: int, intermediate: int, limit: float | None = None):
        super().__init__()
        self.limit = limit
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Router(nn.Module):
    """Scores E experts per token and picks top-k: x [N, D] -> (indices [N, k], weights [N, k]).

    Follows the config: softmax or sigmoid scores; greedy, group_limited_greedy (group score
    = best expert) or noaux_tc (score + e_score_correction_bias for the choice only, group
    score = sum of the group's top two). Unchosen groups are excluded (-inf), as in
    DeepSeek's reference code. Weights come from the raw scores, optionally renormalised,
    times routed_scaling_factor.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = mx.zeros((cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((cfg.n_routed_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T  # [N, E]
        scores = mx.sigmoid(logits) if self.scoring == "sigmoid" else mx.softmax(logits, axis=-1, precise=True)
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.astype(mx.float32)
        if self.method != "greedy" and self.n_group > 1:
            grouped = mx.unflatten(choice, -1, (self.n_group, -1))  # [N, G, E/G]
            if self.method == "noaux_tc":
                group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
            else:
                group_scores = grouped.max(axis=-1)  # [N, G]
            drop = self.n_group - self.topk_group
            if drop:
                dropped = mx.argpartition(group_scores, kth=drop - 1, axis=-1)[:, :drop]
                grouped = mx.put_along_axis(grouped, dropped[..., None], mx.array(-mx.inf, mx.float32), axis=-2)
            choice = mx.flatten(grouped, -2, -1)
        k = self.top_k
        indices = mx.argpartition(-choice, kth=k - 1, axis=-1)[:, :k]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights * self.scaling


class SwitchGLU(nn.Module):
    """The routed experts, stacked: x [N, D], indices [N, k] -> [N, k, D]."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, limit: float | None = None):
        super().__init__()
        self.limit = limit
        self.gate_proj = ExpertLinear(hidden, intermediate, num_experts)
        self.up_proj = ExpertLinear(hidden, intermediate, num_experts)
        self.down_proj = ExpertLinear(intermediate, hidden, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        N, k = indices.shape
        x = x[:, None, None, :]  # [N, 1, 1, D]
        if indices.size >= SORT_PAIRS:
            # Many (token, expert) pairs: sort by expert so each expert's rows are contiguous.
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            y = self.sorted_ffn(x.flatten(0, -3)[order // k], flat[order])
            return y[inv].reshape(N, k, -1)
        return self.gather_ffn(x, indices).squeeze(-2)

    def sorted_ffn(self, xs: mx.array, idx: mx.array) -> mx.array:
        """xs [P, 1, D] whose rows are sorted by expert idx [P] -> [P, 1, D]."""
        if mx.default_device() == mx.cpu:
            return self._per_expert(xs.reshape(xs.shape[0], -1), idx)[:, None, :]
        return self.gather_ffn(xs, idx, sorted_indices=True)

    def gather_ffn(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        """Expert idx[...] applied to x by gathered matmuls: x [..., 1, D], idx [...] -> [..., 1, D]."""
        g = self.gate_proj(x, idx, sorted_indices)
        u = self.up_proj(x, idx, sorted_indices)
        return self.down_proj(swiglu(g, u, self.limit), idx, sorted_indices)

    def _per_expert(self, xs: mx.array, idx: mx.array) -> mx.array:
        """CPU prefill: xs [P, D] sorted by expert idx [P] -> [P, D], one dense BLAS matmul per
        expert on its contiguous rows (gather_mm would do a matvec per row, rereading the
        expert's weights for each). Experts alternate between two CPU streams, since unpacking
        4-bit weights runs on one core per call. Needs the segment bounds on the host: one sync."""
        E = self.gate_proj["weight"].shape[0]
        ends = mx.cumsum((idx[:, None] == mx.arange(E)).sum(axis=0)).tolist()  # [E]
        streams = cpu_streams()
        outs, start = [], 0
        for e, end in enumerate(ends):
            if end == start:
                continue
            with mx.stream(streams[len(outs) % 2]):
                rows = xs[start:end]  # [n_e, D]
                g = self.gate_proj.expert_matmul(rows, e)
                u = self.up_proj.expert_matmul(rows, e)
                outs.append(self.down_proj.expert_matmul(swiglu(g, u, self.limit), e))
            start = end
        return mx.concatenate(outs, axis=0)


class MoE(nn.Module):
    """sum_k weight_k * expert_k(x) + shared_experts(x); x [B, L, D].

    `shard` (None in one process) is set by edge_ds.parallel on an expert-parallel rank: it is
    called as shard(moe, x [N, D], indices [N, k], weights [N, k]) -> [N, D] and computes this
    rank's experts and the all_sum across ranks (a plain attribute, not a parameter)."""

    shard = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.n_shared_experts = cfg.n_shared_experts or 0  # the shared MLP is this many experts wide
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        indices, weights = self.gate(x)
        if self.shard is not None:
            return self.shard(self, x, indices, weights).reshape(shape)
        if self.split_on_cpu(indices):
            return self._two_streams(x, indices, weights).reshape(shape)
        y = self._routed(x, indices, weights)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y.reshape(shape)

    def _routed(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        y = self.switch_mlp(x, indices)  # [N, k, D]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=1)  # [N, D]

    def split_on_cpu(self, indices: mx.array) -> bool:
        return mx.default_device() == mx.cpu and indices.shape[1] > 1 and indices.size < SORT_PAIRS

    def _two_streams(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """Decode on the CPU: the chosen experts in two halves on two CPU streams, the shared
        expert with the second half (each quantized matvec uses one core)."""
        k = indices.shape[1]
        shared = self.n_shared_experts
        h = max(1, min(k - 1, (k + shared) // 2))  # balance routed + shared experts over the two
        first, second = cpu_streams()
        with mx.stream(first):
            a = self._routed(x, indices[:, :h], weights[:, :h])
        with mx.stream(second):
            b = self._routed(x, indices[:, h:], weights[:, h:])
            if shared:
                b = b + self.shared_experts(x)
        return a + b
