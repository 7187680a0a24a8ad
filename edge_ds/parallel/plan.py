"""Which rank holds what, decided before any weight is read (MLX-free, so it can refuse early)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import EdgeDSError
from ..layout import quantization_for

MODES = ("expert", "tensor", "pipeline")


class ParallelError(EdgeDSError):
    """A parallel run cannot go on (a rank died, the model does not divide); names the rank."""


@dataclass(frozen=True)
class ExpertPlan:
    """Routed experts split by expert id, round-robin: rank r holds experts e with e % size == r.

    Round-robin rather than contiguous blocks: DeepSeek's group-limited routing (V3: 8 groups, a
    token's experts from 4 of them) picks experts in contiguous id ranges, so blocks would tend to
    put all of a token's experts on one rank and make the others wait; round-robin spreads every
    group over every rank. Reading costs the same: each expert's slice is one pread either way."""

    rank: int
    size: int
    num_experts: int

    @property
    def owned(self) -> list[int]:
        """Global ids of this rank's experts, ascending (their local ids are their positions)."""
        return list(range(self.rank, self.num_experts, self.size))


def expert_plan(cfg: ModelConfig, rank: int, size: int) -> ExpertPlan:
    """This rank's share; refuses a model whose experts do not divide over `size` ranks."""
    E = cfg.n_routed_experts or 0
    if not cfg.moe_layers or E == 0:
        raise ParallelError(f"--parallel expert: the model has no routed experts to split over {size} ranks")
    if E < size:
        raise ParallelError(f"--parallel expert: n_routed_experts = {E} is fewer than the {size} ranks "
                            "(every rank needs at least one expert)")
    if E % size:
        raise ParallelError(f"--parallel expert: n_routed_experts = {E} does not divide over {size} ranks "
                            f"({E} % {size} = {E % size}); use a rank count that divides it")
    return ExpertPlan(rank, size, E)


# --- tensor parallelism --------------------------------------------------------------------
# Which axis of a checkpoint tensor a tensor-parallel rank takes its share of (by name, either
# layout): "rows" split the output dimension (axis 0 of a 2-D weight, axis 1 of stacked experts),
# "cols" the input dimension (the last axis: packed words and scale groups alike), "heads" the head
# axis of mlx-lm's per-head embed_q/unembed_out. Anything else is replicated.
_SPLITS = [
    (re.compile(r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj)\.(weight|scales|biases)$"), "rows"),
    (re.compile(r"\.self_attn\.(embed_q|unembed_out)\.(weight|scales|biases)$"), "heads"),
    (re.compile(r"\.self_attn\.o_proj\.(weight|scales|biases)$"), "cols"),
    (re.compile(r"\.mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj)\.(weight|scales|biases)$"), "rows"),
    (re.compile(r"\.mlp\.(shared_experts\.|experts\.\d+\.)?down_proj\.(weight|scales|biases)$"), "cols"),
    (re.compile(r"\.mlp\.switch_mlp\.(gate_proj|up_proj)\.(weight|scales|biases)$"), "expert_rows"),
    (re.compile(r"\.mlp\.switch_mlp\.down_proj\.(weight|scales|biases)$"), "cols"),
]


@dataclass(frozen=True)
class TensorPlan:
    """mlx-lm's tensor parallelism for DeepSeek: rank r holds heads [r*H/size, (r+1)*H/size) of
    every attention layer (its rows of q_proj/q_b_proj and kv_b_proj, its heads of embed_q and
    unembed_out, its input columns of o_proj) and the same share of the intermediate dimension of
    every dense MLP, shared expert and routed expert (gate/up rows, down columns). Embeddings,
    norms, routers, q_a/kv_a projections and the head are replicated."""

    rank: int
    size: int

    def split(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(axis, lo, hi): this rank's slice of checkpoint tensor `name` of `shape`; None when
        every rank reads it whole. Raises when the axis does not divide over the ranks."""
        kind = next((k for pattern, k in _SPLITS if pattern.search(name)), None)
        if kind is None or not shape:
            return None
        axis = {"rows": 0, "heads": 0, "expert_rows": 1, "cols": len(shape) - 1}[kind]
        if axis >= len(shape):
            raise ParallelError(f"--parallel tensor: tensor {name!r} has shape {list(shape)}, expected at least "
                                f"{axis + 1} dimensions")
        n = shape[axis]
        if n % self.size:
            raise ParallelError(f"--parallel tensor: tensor {name!r} (shape {list(shape)}) does not split over "
                                f"{self.size} ranks along axis {axis} ({n} % {self.size} = {n % self.size})")
        step = n // self.size
        return axis, self.rank * step, (self.rank + 1) * step

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """cfg with this rank's head count and intermediate sizes: what its modules are built from."""
        return dataclasses.replace(
            cfg, num_attention_heads=cfg.num_attention_heads // self.size,
            intermediate_size=cfg.intermediate_size // self.size,
            moe_intermediate_size=cfg.moe_intermediate_size // self.size)


def tensor_plan(cfg: ModelConfig, rank: int, size: int) -> TensorPlan:
    """This rank's share; refuses, from config.json alone, a model whose heads or intermediate
    sizes do not divide over `size` ranks, or whose quantized column splits (o_proj, down_proj)
    would cut a quantization group."""
    def refuse(why: str) -> None:
        raise ParallelError(f"--parallel tensor: {why}")

    if cfg.model_type == "deepseek_v4":
        refuse("DeepSeek-V4 is not supported (its grouped output projection and hyper-connections are not "
               "split); use --parallel expert")
    H, v = cfg.num_attention_heads, cfg.v_head_dim
    if H % size:
        refuse(f"num_attention_heads = {H} does not divide over {size} ranks ({H} % {size} = {H % size})")
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    sizes = [("intermediate_size", cfg.intermediate_size, dense)]
    if cfg.moe_layers:
        sizes.append(("moe_intermediate_size", cfg.moe_intermediate_size, cfg.moe_layers))
    for field, n, layers in sizes:
        if layers and n % size:
            refuse(f"{field} = {n} does not divide over {size} ranks ({n} % {size} = {n % size})")
    # Column splits of quantized weights must keep whole groups (each row's groups run along the input).
    cols = [(f"model.layers.{i}.self_attn.o_proj", H * v, f"num_attention_heads x v_head_dim = {H} x {v}")
            for i in range(cfg.num_hidden_layers)]
    for i in dense:
        cols.append((f"model.layers.{i}.mlp.down_proj", cfg.intermediate_size, "intermediate_size"))
    for i in cfg.moe_layers:
        cols.append((f"model.layers.{i}.mlp.switch_mlp.down_proj", cfg.moe_intermediate_size,
                     "moe_intermediate_size"))
        if cfg.n_shared_experts:
            cols.append((f"model.layers.{i}.mlp.shared_experts.down_proj",
                         cfg.moe_intermediate_size * cfg.n_shared_experts, "moe_intermediate_size x n_shared_experts"))
    for path, n, what in cols:
        q = quantization_for(cfg, path)
        if q is None or not q.get("group_size") or n % q["group_size"]:
            continue  # not quantized (mlx-lm leaves a weight whose rows are not whole groups in float)
        gs, bits = q["group_size"], q.get("bits") or 32
        local = n // size
        if local % gs or (local * bits) % 32:
            refuse(f"{path}'s input ({what} = {n}) splits into {local} columns per rank over {size} ranks, not a "
                   f"whole number of quantization groups of {gs} (config.json quantization.group_size); use a "
                   f"rank count for which {n} / ranks is a multiple of {gs}")
    return TensorPlan(rank, size)


def hosts() -> list[str]:
    """Each rank's address as mlx.launch's ring hostfile (MLX_HOSTFILE) gives it, else []."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return []
    try:
        with open(path) as f:
            ring = json.load(f)
        return [", ".join(node) if isinstance(node, list) else str(node) for node in ring]
    except (OSError, ValueError):
        return []


def describe(rank: int) -> str:
    """'rank 1 (127.0.0.1:5001)' when the host is known, else 'rank 1'."""
    h = hosts()
    return f"rank {rank} ({h[rank]})" if rank < len(h) else f"rank {rank}"
